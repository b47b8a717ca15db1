"""Assemble one self-contained, offline, deterministic HTML page from sections of figures/tables.

plotly.js is inlined once in <head> (every figure div then calls the global `Plotly`), figure divs
get stable ids `fig-<name>`, and nothing time- or random-dependent is written, so building the
same run twice gives byte-identical files. Every string that reaches the page goes through
`html.escape` here; figure JSON is made script-safe by Plotly's own serializer.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 1em 2em; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.missing { color: #888; font-style: italic; } p.problem { color: #b00; }
nav a { margin-right: 1em; } code { background: #f3f3f3; padding: 0 3px; }
.figure { margin: 1em 0; }
"""


@dataclass
class Section:
    """A titled part of the report: an intro, then tables and figures -- or a 'missing' note."""

    key: str                                   # stable anchor id
    title: str
    intro: str = ""                            # plain text, escaped on output
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)  # (stable name, figure)
    tables: list[str] = field(default_factory=list)                     # already-rendered table HTML
    missing: str = ""                          # e.g. "not computed yet: run `spectra spectrum`"
    problems: list[str] = field(default_factory=list)


def slug(s: str) -> str:
    """A stable, id-safe name (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "x"


def table(headers: list[str], rows: list[list], numeric_cols: tuple[int, ...] = ()) -> str:
    """An escaped HTML table; cells may be any value (str() is taken)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td{" class=num" if j in numeric_cols else ""}>{html.escape(str(c))}</td>'
                        for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure_div(name: str, fig: go.Figure) -> str:
    # no plotly.js here (it is in <head> once); a fixed div id keeps the output deterministic
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{slug(name)}",
                       default_height="450px", config={"displaylogo": False, "responsive": True})


def _code(text: str) -> str:
    """Escape text, then render `backticked` parts as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _section(sec: Section) -> str:
    parts = [f'<section id="{slug(sec.key)}"><h2>{html.escape(sec.title)}</h2>']
    if sec.intro:
        parts.append(f"<p>{_code(sec.intro)}</p>")
    parts += [f'<p class="problem">could not read {_code(p)}</p>' for p in sec.problems]
    if sec.missing and not sec.problems:  # an unreadable input is not "not computed yet"
        parts.append(f'<p class="missing">{_code(sec.missing)}</p>')
    parts += sec.tables
    parts += [f'<div class="figure">{figure_div(name, fig)}</div>' for name, fig in sec.figures]
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, summary: list[tuple[str, str]], sections: list[Section]) -> str:
    """The whole report: title, summary table, a contents line, then every section in order."""
    nav = " ".join(f'<a href="#{slug(s.key)}">{html.escape(s.title)}</a>' for s in sections)
    summary_html = table(["", ""], [[k, v] for k, v in summary]).replace("<thead><tr><th></th><th></th></tr></thead>", "")
    body = "\n".join(_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n"
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<section id=\"summary\"><h2>Summary</h2>{summary_html}</section>\n"
        f"<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )
