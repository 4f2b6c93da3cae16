"""The shell blocks of README.md and docs/ call jobs and benchmarks with flags they really take.

Each ``jobs/*.py`` or ``benchmarks/*.py`` invocation in a ``bash``/``sh`` block is checked
against the script's own ``--help`` (one process per script and subcommand, cached): the
script exists, the subcommand exists, and every ``--flag`` the documentation uses is named
in the help. A ``make TARGET`` must be a target of the Makefile.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

from tests.docs.doc_blocks import ROOT, doc_pages, fenced_blocks, invocations, make_targets

pytestmark = pytest.mark.slow  # one --help process per script: about a minute on 2 busy cores


def _scripts_with_subcommands() -> dict[str, set[str]]:
    """Scripts whose parser has subcommands (read from their source: no process at collection)."""
    out = {}
    for path in [*ROOT.glob("jobs/*.py"), *ROOT.glob("benchmarks/*.py")]:
        source = path.read_text(encoding="utf-8")
        if "add_subparsers" in source:
            out[str(path.relative_to(ROOT))] = set(re.findall(r"add_parser\(\s*['\"]([\w-]+)['\"]", source))
    return out


_FLAG = re.compile(r"(?<![\w-])--[\w-]+")
SUBCOMMANDS = _scripts_with_subcommands()
BLOCKS = [block for page in doc_pages() for block in fenced_blocks(page)]
CALLS = invocations(BLOCKS, SUBCOMMANDS)


def _flag_cases() -> list:
    cases: dict[tuple[str, str | None, str], list[str]] = {}
    for call in CALLS:
        for flag in call.flags:
            cases.setdefault((call.script, call.subcommand, flag), []).append(call.where)
    return [
        pytest.param(script, sub, flag, where, id=f"{script}{' ' + sub if sub else ''} {flag}")
        for (script, sub, flag), where in sorted(cases.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2]))
    ]


@functools.cache
def script_help(script: str, subcommand: str | None) -> str:
    """``python SCRIPT [SUBCOMMAND] --help`` from the repository root (cached per session)."""
    argv = [sys.executable, script, *([subcommand] if subcommand else []), "--help"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{' '.join(argv[1:])} exited {done.returncode}:\n{done.stderr[-2000:]}"
    return done.stdout


def test_the_docs_call_jobs_at_all():
    """The extraction works: the README's quickstart alone calls several jobs with flags."""
    scripts = {call.script for call in CALLS}
    assert {"jobs/train_victims.py", "jobs/attack.py", "jobs/serve.py", "jobs/sweep.py"} <= scripts, scripts
    assert any(call.flags for call in CALLS)


@pytest.mark.parametrize("script", sorted({call.script for call in CALLS}))
def test_documented_script_exists(script):
    assert (ROOT / script).is_file(), f"the docs call {script}, which does not exist"


@pytest.mark.parametrize(
    "script,subcommand",
    sorted({(c.script, c.subcommand) for c in CALLS if c.subcommand}, key=str),
)
def test_documented_subcommand_exists(script, subcommand):
    assert subcommand in SUBCOMMANDS[script], (
        f"the docs call {script} {subcommand}, but its subcommands are {sorted(SUBCOMMANDS[script])}"
    )


@pytest.mark.parametrize("script,subcommand,flag,where", _flag_cases())
def test_documented_flag_exists(script, subcommand, flag, where):
    text = script_help(script, subcommand)
    if flag in ("--help",):
        return
    known = sorted(set(_FLAG.findall(text)))
    command = f"{script} {subcommand}" if subcommand else script
    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
        f"{command} has no flag {flag} (used at {', '.join(where)}); its --help names: {known}"
    )


@pytest.mark.parametrize("target,where", sorted(set(make_targets(BLOCKS))))
def test_documented_make_target_exists(target, where):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^{re.escape(target)}\s*:", makefile, re.M), f"make {target} (at {where}) is not a Makefile target"
