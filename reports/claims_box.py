"""The box the report opens with: "What the paper claims — what this run shows", one row per row of the run's
`claims` group (spectra.analysis.claims: `spectra claims RUN`), coloured by verdict.

Each row gives the paper's statement, the effect with its CI, the one-sided p in the paper's direction, n, the
verdict, and for every row that is not "supported" the why (a missing input, too few units, a CI that holds the
null ...). The definitions (each row's `statistic`) and the group's settings follow in a folded part, so the
box stays one screen tall while every number on it stays defined.
"""

from __future__ import annotations

import html
import math

import xarray as xr

from reports.html import slug, table
from reports.style import fmt

TITLE = "What the paper claims — what this run shows"
VERDICTS = ("supported", "contradicted", "inconclusive", "not testable here")
MISSING = ("not computed yet: run `spectra claims RUN` (RUN: this run's folder) to turn the paper's claims into "
           "statistics with uncertainty and verdicts, then rebuild this report")


def verdict_class(verdict: str) -> str:
    """The CSS class of a row with this verdict ("verdict-not-testable-here")."""
    return slug(f"verdict {verdict}")


def _text(ds: xr.Dataset, var: str, claim) -> str:
    return str(ds[var].sel(claim=claim).values) if var in ds else ""


def _float(ds: xr.Dataset, var: str, claim) -> float:
    return float(ds[var].sel(claim=claim).values) if var in ds else math.nan


def effect_text(ds: xr.Dataset, claim) -> str:
    """"0.123 [0.05, 0.2]" (effect and CI to 3 significant digits), the effect alone without a CI, "–" without one."""
    eff, lo, hi = (_float(ds, v, claim) for v in ("effect", "ci_low", "ci_high"))
    if not math.isfinite(eff):
        return "–"
    ci = f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else " (no CI)"
    return f"{eff:.3g}{ci}"


def claim_rows(ds: xr.Dataset) -> tuple[list[list], list[str]]:
    """The box's table rows (claim, paper, effect [CI], p, n, verdict, why) and their CSS classes, in the
    group's order. The why is left empty on supported rows: only a verdict short of support needs one."""
    rows, classes = [], []
    for c in ds["claim"].values:
        verdict = _text(ds, "verdict", c)
        p, n = _float(ds, "p_value", c), _float(ds, "n", c)
        rows.append([str(c), _text(ds, "paper", c), effect_text(ds, c), fmt(p, ".3g") if math.isfinite(p) else "–",
                     int(n) if math.isfinite(n) else "–", verdict,
                     "" if verdict == "supported" else _text(ds, "why", c)])
        classes.append(verdict_class(verdict))
    return rows, classes


def _counts(ds: xr.Dataset) -> str:
    said = [str(v) for v in ds["verdict"].values] if "verdict" in ds else []
    known = [f"{said.count(v)} {v}" for v in VERDICTS if v in said]
    other = sorted(set(said) - set(VERDICTS))
    return ", ".join(known + [f"{said.count(v)} {v}" for v in other])


def _settings(ds: xr.Dataset) -> str:
    a = ds.attrs
    level = a.get("ci_level")
    parts = [f"CI level {level:.0%}" if isinstance(level, (int, float)) else None,
             *(f"{k} {a[k]}" for k in ("alpha", "min_n", "n_boot", "n_perm", "seed", "tau", "tolerance")
               if k in a), f"inputs: {a['inputs']}" if "inputs" in a else None]
    return "; ".join(p for p in parts if p)


def claims_box(ds: xr.Dataset | None, problem: str | None = None) -> str:
    """The box's HTML: the table of `ds` (the run's claims group), or the hint to compute it when it is None, or
    the reason it could not be read."""
    head = f'<section id="claims" class="claims"><h2>{html.escape(TITLE)}</h2>'
    if problem:
        return f'{head}<p class="problem">could not read <code>claims</code>: {html.escape(problem)}</p></section>'
    if ds is None or "claim" not in ds.dims or not ds.sizes["claim"]:
        hint = html.escape(MISSING).replace("`spectra claims RUN`", "<code>spectra claims RUN</code>")
        return f'{head}<p class="missing">{hint}</p></section>'
    rows, classes = claim_rows(ds)
    intro = (f"<p>{html.escape(_counts(ds))}. Effect with its bootstrap CI; p: the one-sided permutation p-value in "
             "the paper's direction; n: the units the statistic averages or correlates over. Rows are coloured by "
             "verdict: <span class=\"verdict-supported\">supported</span>, <span class=\"verdict-contradicted\">"
             "contradicted</span>, <span class=\"verdict-inconclusive\">inconclusive</span>, <span class=\""
             "verdict-not-testable-here\">not testable here</span>. Each row is tested on its own, with no "
             "correction across rows.</p>")
    body = table(["claim", "the paper says", "effect [CI]", "p", "n", "verdict", "why (rows not supported)"], rows,
                 numeric_cols=(2, 3, 4), row_classes=classes)
    defs = table(["claim", "statistic"], [[str(c), _text(ds, "statistic", c)] for c in ds["claim"].values])
    notes = [f"<p><b>Settings</b>: {html.escape(_settings(ds))}</p>"]
    for key, name in (("verdict_rules", "Verdict rules"), ("figure_1_gap", "Which gap Figure 1 uses")):
        if ds.attrs.get(key):
            notes.append(f"<p><b>{name}</b>: {html.escape(str(ds.attrs[key]))}</p>")
    folded = f"<details><summary>definitions of every statistic, and the settings</summary>{defs}{''.join(notes)}" \
             "</details>"
    return f"{head}{intro}{body}{folded}</section>"
