"""Assemble one self-contained, offline, deterministic HTML page from sections of figures/tables.

plotly.js and all figure specs travel inside the page, gzip-compressed and base64-encoded (5.5 MB
of plain plotly.js + JSON became ~2 MB); a short script inflates them with the browser's own
`DecompressionStream` (Chrome 80+, Firefox 113+, Safari 16.4+), runs plotly.js once and draws
every figure into its div (stable id `fig-<name>`). Tables and text stay plain HTML, readable
without scripts. gzip is written with mtime 0 and nothing time- or random-dependent goes in, so
building the same run twice gives byte-identical files. Every string that reaches the page goes
through `html.escape` here; base64 needs no script escaping.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

import plotly.graph_objects as go
import plotly.io as pio
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
tr.worse td { background: #fde0dd; color: #8b0000; font-weight: 600; }
section.claims { border: 2px solid #555; border-radius: 6px; padding: 0 1em .5em; margin-top: 1em; }
section.claims h2 { margin-top: .6em; } section.claims table { font-size: 13px; }
section.claims td.num { white-space: nowrap; } section.claims td:nth-child(6) { font-weight: 600; }
.verdict-supported, tr.verdict-supported td { background: #d9f0d3; }
.verdict-contradicted, tr.verdict-contradicted td { background: #fddbc7; }
.verdict-inconclusive, tr.verdict-inconclusive td { background: #fff2b3; }
.verdict-not-testable-here, tr.verdict-not-testable-here td { background: #eeeeee; color: #555; }
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


def table(headers: list[str], rows: list[list], numeric_cols: tuple[int, ...] = (),
          row_classes: list[str] | None = None) -> str:
    """An escaped HTML table; cells may be any value (str() is taken). `row_classes`: a CSS class per
    row ("" for none), e.g. "worse" to flag a row in red."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f'<td{" class=num" if j in numeric_cols else ""}>{html.escape(str(c))}</td>'
                        for j, c in enumerate(row))
        cls = row_classes[i] if row_classes and i < len(row_classes) else ""
        body.append(f'<tr class="{slug(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


FIG_CONFIG = {"displaylogo": False, "responsive": True}
SIG_DIGITS = 7  # figure numbers on the page: float32 precision (hover shows at most 4-5 digits)

# Inflates plotly.js, runs it, then draws every figure; an old browser gets one line saying why.
BOOT = """(async function () {
  async function inflate(id) {
    var bin = atob(document.getElementById(id).textContent);
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    return await new Response(stream).text();
  }
  try {
    var lib = document.createElement('script');
    lib.text = await inflate('plotly-js-gz');
    document.head.appendChild(lib);
    var figures = JSON.parse(await inflate('figures-gz'));
    for (var j = 0; j < figures.length; j++) {
      var f = figures[j];
      await Plotly.newPlot(f.id, f.data, f.layout, f.config);
    }
  } catch (e) {
    var p = document.createElement('p');
    p.className = 'problem';
    p.textContent = 'figures could not be drawn (this page needs a browser with DecompressionStream): ' + e;
    document.body.insertBefore(p, document.body.firstChild);
  }
})();"""


def figure_div(name: str, fig: go.Figure) -> str:
    """The empty div a figure is drawn into (its spec goes into the compressed payload)."""
    height = f"{fig.layout.height}px" if fig.layout.height else "450px"  # as plotly's to_html sizes it
    return f'<div id="fig-{slug(name)}" class="plotly-graph-div" style="height:{height}; width:100%;"></div>'


def figure_spec(name: str, fig: go.Figure) -> dict:
    """What `Plotly.newPlot` gets for one figure, numbers rounded to SIG_DIGITS significant digits."""
    spec = json.loads(pio.to_json(fig, validate=False, engine="json"),
                      parse_float=lambda s: float(f"{float(s):.{SIG_DIGITS}g}"))
    return {"id": f"fig-{slug(name)}", "data": spec.get("data", []), "layout": spec.get("layout", {}),
            "config": FIG_CONFIG}


def packed(text: str) -> str:
    """gzip (mtime 0: deterministic) + base64 of text."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


@lru_cache(maxsize=1)
def _packed_plotlyjs() -> str:
    # ~1 s (gzip -9 of 4.8 MB); the same for every report a process builds
    return packed(get_plotlyjs())


def unpacked(b64: str) -> str:
    """The inverse of `packed` (tests read a page's payloads with it)."""
    return gzip.decompress(base64.b64decode(b64)).decode("utf-8")


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


def page(title: str, summary: list[tuple], sections: list[Section], lead: str = "") -> str:
    """The whole report: title, `lead` (HTML that comes first: the claims box), summary table (rows (key,
    value) or (key, value, css class)), a contents line, then every section in order, and at the end the
    compressed plotly.js and figure specs with the script that draws them."""
    nav = " ".join(f'<a href="#{slug(s.key)}">{html.escape(s.title)}</a>' for s in sections)
    summary_html = table(["", ""], [[r[0], r[1]] for r in summary], row_classes=[r[2] if len(r) > 2 else ""
                                                                                 for r in summary])
    summary_html = summary_html.replace("<thead><tr><th></th><th></th></tr></thead>", "")
    body = "\n".join(_section(s) for s in sections)
    lead = f"{lead}\n" if lead else ""
    specs = [figure_spec(name, fig) for s in sections for name, fig in s.figures]
    figures = json.dumps(specs, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"generator\" "
        "content=\"spectra report\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n"
        "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n</head>\n<body>\n"
        "<noscript><p class=\"problem\">figures need JavaScript; the tables below do not</p></noscript>\n"
        f"<h1>{html.escape(title)}</h1>\n{lead}<section id=\"summary\"><h2>Summary</h2>{summary_html}</section>\n"
        f"<nav>{nav}</nav>\n{body}\n"
        f"<script type=\"application/gzip;base64\" id=\"plotly-js-gz\">{_packed_plotlyjs()}</script>\n"
        f"<script type=\"application/gzip;base64\" id=\"figures-gz\">{packed(figures)}</script>\n"
        f"<script type=\"text/javascript\">{BOOT}</script>\n</body>\n</html>\n"
    )
