"""Helpers of the documentation tests: the repository's markdown pages and their fenced blocks."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```([\w+-]*)\s*$")
# python, python3, .venv/bin/python, $(PY) ... followed by a job or benchmark script.
_INVOCATION = re.compile(
    r"(?:^|[\s;&|(])(?:\S*/)?(?:python3?|\$\(PY\))\s+((?:jobs|benchmarks)/[\w-]+\.py)\b(.*)$"
)
_MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([\w-]+)")


def doc_pages() -> list[Path]:
    """README.md, CHANGELOG.md and every markdown page under docs/."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in pages if p.exists()]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    text: str


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a markdown page, with its language tag."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = _FENCE.match(line.strip())
        if lang is None and match:
            lang, start, lines = match.group(1).lower(), number + 1, []
        elif lang is not None and line.strip() == "```":
            blocks.append(Block(page, start, lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


@dataclass(frozen=True)
class Invocation:
    script: str  # jobs/attack.py
    subcommand: str | None
    flags: tuple[str, ...]
    where: str  # page:line


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """Lines of a shell block with backslash continuations joined, with their first line number."""
    out, current, first = [], "", None
    for offset, line in enumerate(block.text.splitlines()):
        if first is None:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append((first, current + line))
        current, first = "", None
    if current:
        out.append((first, current))
    return out


def _words(rest: str) -> list[str]:
    """The words of one command, up to the next shell operator or comment."""
    try:
        words = shlex.split(rest, comments=True)
    except ValueError:
        words = rest.split()
    out = []
    for word in words:
        if word in ("&&", "||", ";", "|", "&", ">", ">>", "2>&1") or word.startswith("#"):
            break
        out.append(word)
    return out


def invocations(blocks: list[Block], subcommands: dict[str, set[str]]) -> list[Invocation]:
    """Job and benchmark calls of shell blocks; ``subcommands`` maps a script to its subparsers."""
    found = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in _logical_lines(block):
            match = _INVOCATION.search(line)
            if not match:
                continue
            script, words = match.group(1), _words(match.group(2))
            sub = None
            if script in subcommands and words and not words[0].startswith("-"):
                sub = words[0]
            flags = tuple(sorted({w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2}))
            where = f"{block.page.relative_to(ROOT)}:{number}"
            found.append(Invocation(script, sub, flags, where))
    return found


def make_targets(blocks: list[Block]) -> list[tuple[str, str]]:
    """(target, page:line) of every ``make TARGET`` in shell blocks."""
    out = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in _logical_lines(block):
            code = line.split("#", 1)[0]
            for match in _MAKE.finditer(code):
                out.append((match.group(1), f"{block.page.relative_to(ROOT)}:{number}"))
    return out
