"""HTML building blocks of the report: escaping, number formatting, tables, figures, the page (pure strings).

Every piece of text that reaches the page goes through :func:`esc`; numbers are written
with a short display form and their full value in ``data-value`` so tests and scripts
can read back exactly what the runs hold.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from string import Template
from typing import Any

__all__ = [
    "SECTION_STATES",
    "Column",
    "Section",
    "esc",
    "figure_html",
    "fmt",
    "missing_html",
    "page_html",
    "provenance_html",
    "table_html",
]

MISSING = "not run yet"
_DASH = "\u2014"
_KINDS = ("text", "num", "int", "pct", "arrow")


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def fmt(value: Any, kind: str = "num", digits: int = 3) -> str:
    """Display text of a value: 3 decimals (``num``), an integer with separators (``int``),
    a percentage (``pct``, 0.6 -> 60.0%), or the text itself; missing values show a dash."""
    if kind == "text":
        return _DASH if value is None or value == "" else str(value)
    number = _number(value)
    if number is None:
        # NaN and inf are "no value" too (a drop from a zero score, a metric never logged)
        missing = (
            value is None or value == "" or (isinstance(value, float) and not math.isfinite(value))
        )
        return _DASH if missing else str(value)
    if kind == "int":
        return f"{int(round(number)):,}"
    if kind == "pct":
        return f"{100 * number:.1f}%"
    return f"{number:.{digits}f}"


@dataclass(frozen=True)
class Column:
    """A table column: the row key it shows, its header, and how values are written.

    ``kind`` ``arrow`` shows ``<key>_pre -> <key>_post`` of a metric (``key`` is the
    metric name, e.g. ``nmi``), with both full values as data attributes.
    """

    key: str
    label: str
    kind: str = "num"
    title: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"column {self.key!r}: kind must be one of {_KINDS}, got {self.kind!r}"
            )


def _cell(row: Mapping[str, Any], column: Column) -> str:
    key = esc(column.key)
    if column.kind == "arrow":
        pre, post = row.get(f"{column.key}_pre"), row.get(f"{column.key}_post")
        attrs = f' data-key="{key}"'
        for name, value in (("pre", pre), ("post", post)):
            number = _number(value)
            if number is not None:
                attrs += f' data-{name}="{esc(repr(number))}"'
        text = f"{esc(fmt(pre))} &rarr; {esc(fmt(post))}"
        return f'<td class="num"{attrs}>{text}</td>'
    value = row.get(column.key)
    number = _number(value) if column.kind != "text" else None
    attrs = f' data-key="{key}"'
    if number is not None:
        attrs += f' data-value="{esc(repr(number))}"'
    css = "num" if column.kind != "text" else "text"
    return f'<td class="{css}"{attrs}>{esc(fmt(value, column.kind))}</td>'


def table_html(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    caption: str | None = None,
    table_id: str | None = None,
) -> str:
    """An HTML table of ``rows`` (one ``<tr>`` each, ``data-row`` = index) over ``columns``."""
    head = "".join(
        f'<th title="{esc(c.title)}">{esc(c.label)}</th>' if c.title else f"<th>{esc(c.label)}</th>"
        for c in columns
    )
    body = "\n".join(
        f'<tr data-row="{i}">' + "".join(_cell(row, c) for c in columns) + "</tr>"
        for i, row in enumerate(rows)
    )
    ident = f' id="{esc(table_id)}"' if table_id else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    # wide tables scroll inside their box instead of running off the page
    return (
        f'<div class="scroll"><table{ident}>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
        "</tbody></table></div>"
    )


def figure_html(src: str, caption: str, alt: str | None = None) -> str:
    """An embedded figure by relative path (a file inside the report folder)."""
    if "://" in src or src.startswith(("/", "\\")):
        raise ValueError(
            f"figure paths must be relative to the report folder (it must open offline), got {src!r}"
        )
    return (
        f'<figure><img src="{esc(src)}" alt="{esc(alt or caption)}" loading="eager">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def missing_html(command: str, why: str = "") -> str:
    """The placeholder of a section whose inputs do not exist: what to run to produce them."""
    reason = f" ({esc(why)})" if why else ""
    return f'<p class="missing">{MISSING}{reason}: <code>{esc(command)}</code></p>'


def provenance_html(items: Mapping[str, Any], run_ids: Sequence[str] = ()) -> str:
    """How numbers were obtained (``items``: victim, dataset, gradient source, ...) and their MLflow runs."""
    # floats as 6 significant digits: eps 0.159448, not 0.15944831696449163 (tables keep full values)
    shown = {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in items.items()}
    parts = [f"<span><b>{esc(k)}</b> {esc(fmt(v, 'text'))}</span>" for k, v in shown.items()]
    for run_id in run_ids:
        parts.append(f'<span><b>MLflow run</b> <code class="run-id">{esc(run_id)}</code></span>')
    return f'<p class="provenance">{" ".join(parts)}</p>'


#: What a section holds: its figures, a failed analysis (and why), an analysis the sweep did not
#: ask for (and how to ask), or inputs that do not exist (and the command that makes them).
SECTION_STATES = ("filled", "failed", "not_requested", "missing")
_STATE_NOTE = {"failed": "failed", "not_requested": "not requested", "missing": MISSING}


@dataclass(frozen=True)
class Section:
    """One section of the page; ``filled`` False when it lacks its content, ``state`` says why."""

    ident: str
    title: str
    body: str
    filled: bool = True
    state: str = ""

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", "filled" if self.filled else "missing")
        if self.state not in SECTION_STATES:
            raise ValueError(f"section {self.ident!r}: state must be one of {SECTION_STATES}, got {self.state!r}")
        if self.filled != (self.state == "filled"):
            raise ValueError(f"section {self.ident!r}: filled={self.filled} contradicts state {self.state!r}")


_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; } th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
td[data-key="run_id"], td[data-key="best_trial"] { font-family: monospace; font-size: .85em; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; max-width: 60em; }
.missing { background: #fff6e0; border-left: 4px solid #e0a800; padding: .5em .8em; overflow-wrap: anywhere; }
.failed { background: #fdecea; border-left: 4px solid #c62828; padding: .5em .8em; overflow-wrap: anywhere; }
ul.failed { padding-left: 2em; }
.provenance { font-size: .85em; color: #444; background: #f7f7fb; padding: .4em .6em; overflow-wrap: anywhere; }
.provenance span { margin-right: 1em; display: inline-block; max-width: 100%; }
section, figure, figcaption, p, li { overflow-wrap: anywhere; }
figure { max-width: 100%; box-sizing: border-box; }
table { overflow-wrap: normal; }
.note { font-size: .9em; color: #444; }
nav ul { columns: 2; font-size: .9em; }
code { font-size: .92em; }
</style>
</head>
<body>
<h1>$title</h1>
$header
<nav><ul>
$toc
</ul></nav>
$sections
<footer class="note"><p>$footer</p></footer>
</body>
</html>
"""
)


def page_html(title: str, sections: Sequence[Section], header: str = "", footer: str = "") -> str:
    """The whole page: title, a header block (already HTML), a table of contents and the sections."""
    toc = "\n".join(
        f'<li><a href="#{esc(s.ident)}">{esc(s.title)}</a>{"" if s.filled else f" ({_STATE_NOTE[s.state]})"}</li>'
        for s in sections
    )
    body = "\n".join(
        f'<section id="{esc(s.ident)}" data-filled="{str(s.filled).lower()}" data-state="{esc(s.state)}">\n'
        f"<h2>{esc(s.title)}</h2>\n{s.body}\n</section>"
        for s in sections
    )
    return _PAGE.substitute(
        title=esc(title), header=header, toc=toc, sections=body, footer=esc(footer)
    )
