"""The WeLore paper's theory tested on one run: every claim of §2.2–2.4 and Figures 1 and 4 turned into a
statistic with an effect size, a bootstrap CI, a permutation p-value, n and a verdict.

The inputs are a run's analysis groups as xarray Datasets (`hessian_gap`, `hessian_drift`,
`hessian_alignment`, `grad_subspace`, `spectrum`), a rank map and finetune results; any may be missing, and
the claims it feeds are then "not testable here", with why. The array statistics are in
`spectra.analysis.claims_stats`; this module picks the data each claim needs and judges it.

Verdict rules, the same for every row (`null` is 0, except for Figure 4's perplexity ratio, where it is
1 + tolerance; `direction` is the side of null the paper predicts):

- not testable here: an input is missing; or fewer than min_n units (steps, layers, components, pairs,
  windows) or layers to resample; or so few units that no permutation p can fall below alpha (a one-sided
  p is at least 1 / the number of distinct arrangements). The why says which. No verdict comes from too few
  points: such rows keep their effect as a description, with no CI and no p.
- supported: the (1 − alpha) percentile CI lies entirely on the paper's side of null, and the one-sided
  permutation p in the paper's direction is < alpha.
- contradicted: the CI lies entirely on the opposite side, and the one-sided p in that direction is < alpha.
- inconclusive: anything else (the CI contains null, the CI and the p disagree, or no CI can be formed).

Each row is tested on its own at alpha, with no correction across rows: they test different claims, but
read one "supported" among many rows with that in mind. Every resampling draws from its own numpy Generator,
seeded by (seed, crc32(claim name)), so a row's numbers do not depend on which other rows exist.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from spectra.analysis import claims_stats as cs
from spectra.compression.rankmap import map_entries
from spectra.errors import SpectraError

NOT_TESTABLE, SUPPORTED, CONTRADICTED, INCONCLUSIVE = "not testable here", "supported", "contradicted", "inconclusive"
CLEAR_GAP, FLAT_GAP = ("q", "k", "o", "gate"), ("v", "up", "down")  # Figure 1's two groups of components

PAPER = {
    "thm2.1a": "Theorem 2.1(a): the Hessian's eigenvalues stabilize; their step-to-step changes decay to zero",
    "thm2.1b": "Theorem 2.1(b): the Hessian's top-r eigenspace stabilizes; its step-to-step changes vanish",
    "thm2.2": "Theorem 2.2: the gradient aligns with the dominant Hessian eigenspace, ||(I - UU^T)G|| / ||G|| -> 0",
    "fig1a": "Figure 1: q, k, o and gate show clearer Hessian gaps than v, up and down",
    "fig1b": "Figure 1: early and late layers show clearer Hessian gaps than middle layers",
    "fig1c": "Figure 1: components with a clear Hessian gap become more low-rank",
    "sec2.4": "Section 2.4: components with a clear Hessian gap stabilize their gradient subspace faster",
    "fig4": "Figure 4 / Section 3: finetuning only the low-rank components (WeLore) tracks full finetuning",
}
FIG1_GAP = ("Figure 1 plots the 'Hessian gap', which Section 2.4 defines as the difference between the dominant "
            "and non-dominant eigenvalues: the absolute gap lambda_k - lambda_{k+1}; the paper never divides it by "
            "lambda_1. The relative gap (lambda_k - lambda_{k+1}) / |lambda_1| removes the curvature scale, which "
            "differs between components and layers; both are tested.")
VERDICT_RULES = ("supported: the (1 - alpha) percentile bootstrap CI lies on the paper's side of null and the "
                 "one-sided permutation p in that direction < alpha; contradicted: the CI lies on the other side "
                 "and the one-sided p that way < alpha; inconclusive: otherwise; not testable here: missing input, "
                 "fewer than min_n units or layers, or too few units for any p < alpha")


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    n_boot: int = 2000
    n_perm: int = 2000
    tau: float = 0.9
    alpha: float = 0.05
    min_n: int = 4
    tolerance: float = 0.05
    min_per_third: int = 3
    certified_only: bool = True

    def __post_init__(self):
        checks = [(self.n_boot >= 100, "n_boot must be >= 100"), (self.n_perm >= 100, "n_perm must be >= 100"),
                  (0 < self.tau <= 1, "tau must be in (0, 1]"), (0 < self.alpha < 0.5, "alpha must be in (0, 0.5)"),
                  (self.min_n >= 3, "min_n must be >= 3"), (self.tolerance >= 0, "tolerance must be >= 0"),
                  (self.min_per_third >= 2, "min_per_third must be >= 2")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise SpectraError(f"claims: {'; '.join(bad)}")

    @property
    def level(self) -> float:
        return 1 - self.alpha

    def rng(self, claim: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(claim.encode())])

    def run(self, fn, claim: str, *args):
        return fn(*args, self.rng(claim), self.n_boot, self.n_perm, self.level)


@dataclass
class Row:
    claim: str
    paper: str
    statistic: str
    direction: int = 1
    null: float = 0.0
    effect: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    p_opposite: float = math.nan
    n: int = 0
    n_units: int = 0
    verdict: str = NOT_TESTABLE
    why: str = ""
    notes: list[str] = field(default_factory=list)


def _untestable(row: Row, why: str) -> Row:
    row.verdict, row.why = NOT_TESTABLE, why
    return row


def _judge(row: Row, est: cs.Estimate, s: Settings, units: str, *, layers: bool = True) -> Row:
    """Copy `est` into `row` and apply the verdict rules (module docstring)."""
    row.effect, row.n, row.n_units = est.effect, est.n, est.n_units
    row.ci_low, row.ci_high = est.ci_low, est.ci_high
    row.p_value, row.p_opposite = (est.p_greater, est.p_less) if row.direction > 0 else (est.p_less, est.p_greater)
    why = ""
    if est.n_units < s.min_n:
        why = f"{est.n_units} {units} < min_n = {s.min_n}"
    elif layers and est.n_layers < s.min_n:
        why = f"{est.n_layers} layers to resample < min_n = {s.min_n}"
    elif est.arrangements and 1 / est.arrangements >= s.alpha:
        why = (f"{est.n_units} {units} allow {est.arrangements} permutation arrangements: no p can fall below "
               f"{1 / est.arrangements:.3g} >= alpha = {s.alpha}")
    elif not math.isfinite(row.effect):
        why = "the statistic is undefined here (constant or missing values)"
    if why:
        row.ci_low = row.ci_high = row.p_value = row.p_opposite = math.nan
        return _untestable(row, why)
    return _decide(row, s)


def _decide(row: Row, s: Settings) -> Row:
    lo, hi, d, null = row.ci_low, row.ci_high, row.direction, row.null
    if not (math.isfinite(lo) and math.isfinite(hi)):
        row.verdict, row.why = INCONCLUSIVE, row.why or "no confidence interval could be formed"
        return row
    ci = f"{s.level:.0%} CI [{lo:.3g}, {hi:.3g}]"
    paper_side, other_side = min(d * (lo - null), d * (hi - null)) > 0, max(d * (lo - null), d * (hi - null)) < 0
    if paper_side and row.p_value < s.alpha:
        row.verdict, row.why = SUPPORTED, f"{ci} excludes {null:g} on the paper's side; p = {row.p_value:.3g}"
    elif other_side and row.p_opposite < s.alpha:
        row.verdict, row.why = CONTRADICTED, (f"{ci} excludes {null:g} on the opposite side; "
                                              f"p = {row.p_opposite:.3g} that way")
    elif paper_side or other_side:
        p = row.p_value if paper_side else row.p_opposite
        row.verdict, row.why = INCONCLUSIVE, f"{ci} excludes {null:g} but the permutation p = {p:.3g} >= {s.alpha}"
    else:
        row.verdict, row.why = INCONCLUSIVE, f"{ci} contains {null:g}"
    return row


# --------------------------------------------------------------------------- inputs
_DIMS = ("step", "layer", "component", "batch")


def _array(da: xr.DataArray, group: str, dims: tuple[str, ...]) -> np.ndarray:
    """da as float64 with exactly `dims` (a missing batch dimension becomes one batch)."""
    extra = set(da.dims) - set(dims)
    if extra or not {"layer", "component"} <= set(da.dims):
        raise SpectraError(f"{group}.{da.name}: dims {da.dims}, expected {dims} (batch optional)")
    if "batch" in dims and "batch" not in da.dims:
        da = da.expand_dims(batch=[0])
    return da.transpose(*dims).values.astype(float)


def _var(ds: xr.Dataset, group: str, name: str) -> xr.DataArray:
    if name not in ds:
        raise SpectraError(f"{group} has no variable {name!r} (it has {', '.join(map(str, ds.data_vars))})")
    return ds[name]


def _last(da: xr.DataArray) -> tuple[xr.DataArray, int | None]:
    """da at its last step with any finite value (da itself when it has no step dimension)."""
    if "step" not in da.dims:
        return da, None
    fin = np.flatnonzero(da.notnull().any([d for d in da.dims if d != "step"]).values)
    i = int(fin[-1]) if fin.size else da.sizes["step"] - 1
    return da.isel(step=i), int(da.step.values[i])


def _steps_with_data(da: xr.DataArray) -> xr.DataArray:
    return da.isel(step=np.flatnonzero(da.notnull().any([d for d in da.dims if d != "step"]).values))


def gap_values(hessian_gap: xr.Dataset, kind: str, certified_only: bool = True) -> tuple[xr.DataArray, str]:
    """The Hessian gap of every (layer, component[, batch]) at the last step, and a note of what was left out.

    abs: λ_k − λ_{k+1}; rel: (λ_k − λ_{k+1}) / |λ_1| (k + 1 = the number of stored eigenvalues). Per batch
    where `eigenvalues_batch` is stored (its batch mean is the stored `gap` / `rel_gap`), else the stored
    batch means. With certified_only, a component whose λ_k or λ_{k+1} failed the Lanczos certificate is
    left out: its gap is not trustworthy."""
    _, step = _last(_var(hessian_gap, "hessian_gap", "eigenvalues_batch" if "eigenvalues_batch" in hessian_gap
                         else "gap"))
    ds = hessian_gap if step is None else hessian_gap.sel(step=step)
    if "eigenvalues_batch" in ds:
        ev = ds.eigenvalues_batch
        g = ev.isel(eig=-2) - ev.isel(eig=-1)
        g = g / abs(ev.isel(eig=0)) if kind == "rel" else g
    else:
        g = _var(ds, "hessian_gap", "gap" if kind == "abs" else "rel_gap")
    g = g.drop_vars([c for c in ("eig", "step") if c in g.coords])
    if not (certified_only and "certified" in ds):
        return g, ""
    ok = (ds.certified.isel(eig=-2) == 1) & (ds.certified.isel(eig=-1) == 1)
    ok = ok.drop_vars([c for c in ("eig", "step") if c in ok.coords])
    ran = g.notnull().any("batch") if "batch" in g.dims else g.notnull()
    dropped = int((ran & ~ok).sum())
    return g.where(ok), f"{dropped} uncertified component(s) left out" if dropped else ""


def eigenvalue_change(eigenvalues: xr.DataArray) -> xr.DataArray:
    """‖λ_t − λ_{t−1}‖₂ / ‖λ_{t−1}‖₂ over the top-k eigenvalues (all stored but the last, the k+1-th that only
    closes the gap), between consecutive stored steps; NaN at the first step."""
    top = eigenvalues.isel(eig=slice(0, -1))
    prev = top.shift(step=1)
    change = ((top - prev) ** 2).sum("eig", skipna=False) ** 0.5 / (prev**2).sum("eig", skipna=False) ** 0.5
    change.attrs = {}  # arithmetic keeps the eigenvalues' long_name and units; a relative change has neither
    return change


def stabilization_step(overlap_prev: xr.DataArray, tau: float) -> xr.DataArray:
    """Per (layer, component): the first step from which `overlap_prev` (the gradient subspace's overlap with the
    previous snapshot's) stays ≥ tau at every later stored step; +inf (censored: it never stabilized within
    the run, so it ranks after every component that did) where the last overlap is < tau; NaN with fewer than 2
    overlaps."""
    v = overlap_prev.transpose("step", ...)
    steps = v.step.values.astype(float)
    vals = v.values
    out = np.full(vals.shape[1:], np.nan)
    for idx in np.ndindex(*vals.shape[1:]):
        col = vals[(slice(None), *idx)]
        fin = np.flatnonzero(np.isfinite(col))
        if fin.size < 2:
            continue
        below = np.flatnonzero(col[fin] < tau)
        out[idx] = math.inf if below.size and below[-1] == fin.size - 1 else \
            steps[fin[below[-1] + 1]] if below.size else steps[fin[0]]
    return xr.DataArray(out, dims=v.dims[1:], coords={d: v[d] for d in v.dims[1:]})


# --------------------------------------------------------------------------- Theorem 2.1 and 2.2: over steps
def _trend_row(claim: str, key: str, da: xr.DataArray | None, missing: str, what: str, direction: int,
               s: Settings) -> Row:
    """`what` (step, layer, component[, batch]) moves in `direction` over training: effect = mean within-series
    Spearman ρ(step, what), series = one (layer, component, batch); averaged over batches, then components, then
    layers (cs.trend). Needs ≥ 3 steps with data and ≥ min_n for a verdict; steps are permuted jointly."""
    word = "decreases" if direction < 0 else "increases"
    row = Row(claim, PAPER[key], f"{what} {word} with the training step: mean within-series Spearman rho(step, "
              f"{what}) (series = layer x component x batch; mean over batches, then components, then layers); "
              "CI: bootstrap over layers and batches; p: steps permuted jointly for all series (one-sided)",
              direction)
    if da is None:
        return _untestable(row, missing)
    da = _steps_with_data(da)
    V = _array(da, claim, _DIMS)
    if V.shape[0] < 3:
        n = V.shape[0]
        return _untestable(row, f"{n} step{'' if n == 1 else 's'} with {what}: a trend needs at least 3")
    return _judge(row, s.run(cs.trend, claim, V, da.step.values), s, "steps")


def _last_vs_first_row(claim: str, key: str, da: xr.DataArray | None, missing: str, what: str,
                       s: Settings) -> Row:
    """The last step-to-step interval against the first: effect = mean over layers (of components, of batches) of
    log(what_last / what_first), each series' first and last finite positive value; < 0 supports (cs.layer_mean)."""
    row = Row(claim, PAPER[key], f"mean log({what} at the last interval / {what} at the first) per series (exp = "
              "the geometric-mean ratio; < 0: it shrank); mean over batches, components, layers; CI: bootstrap "
              "over layers and batches; p: sign flips of the per-layer means (one-sided)", -1)
    if da is None:
        return _untestable(row, missing)
    V = _array(_steps_with_data(da), claim, _DIMS)
    if V.shape[0] < 2:
        n = V.shape[0]
        return _untestable(row, f"{n} step{'' if n == 1 else 's'} with {what}: a first and a last interval need 2")
    fin = np.isfinite(V) & (V > 0)
    first = np.argmax(fin, axis=0)
    last = V.shape[0] - 1 - np.argmax(fin[::-1], axis=0)
    take = lambda i: np.take_along_axis(V, i[None], 0)[0]  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(fin.any(0) & (last > first), np.log(take(last) / take(first)), np.nan)
    return _judge(row, s.run(cs.layer_mean, claim, ratio), s, "layers")


def _stabilization_rows(drift: xr.Dataset | None, gap: xr.Dataset | None, s: Settings) -> list[Row]:
    """Theorem 2.1 (a) from eig_change, (b) from sin_theta, each as a trend and as last vs first interval."""
    change, why_change = None, "no hessian_drift group and no hessian_gap over steps"
    sin, why_sin = None, "no hessian_drift group (hessian-gap over steps with Ritz vectors kept)"
    if drift is not None:
        change = _var(drift, "hessian_drift", "eig_change") if "eig_change" in drift else None
        sin = _var(drift, "hessian_drift", "sin_theta") if "sin_theta" in drift else None
        why_change, why_sin = "hessian_drift has no eig_change", "hessian_drift has no sin_theta"
    if change is None and gap is not None:
        if "step" in gap.dims:
            change = eigenvalue_change(gap["eigenvalues_batch"] if "eigenvalues_batch" in gap else
                                       _var(gap, "hessian_gap", "eigenvalues")).rename("eig_change")
        else:
            why_change = "hessian_gap holds one checkpoint (no step dimension): stabilization needs several steps"
    for da in (change, sin):
        if da is not None and "step" not in da.dims:
            raise SpectraError(f"hessian_drift.{da.name} has no step dimension")
    what_c, what_s = "relative eigenvalue change ||dlambda|| / ||lambda||", "sin theta (top-k eigenspace drift)"
    return [_trend_row("thm2.1a_eig_change_trend", "thm2.1a", change, why_change, what_c, -1, s),
            _last_vs_first_row("thm2.1a_eig_change_last_vs_first", "thm2.1a", change, why_change, what_c, s),
            _trend_row("thm2.1b_sin_theta_trend", "thm2.1b", sin, why_sin, what_s, -1, s),
            _last_vs_first_row("thm2.1b_sin_theta_last_vs_first", "thm2.1b", sin, why_sin, what_s, s)]


def _alignment_rows(al: xr.Dataset | None, s: Settings) -> list[Row]:
    """Theorem 2.2: alignment above the random-subspace baseline at the last step, and rising over steps."""
    missing = "no hessian_alignment group (hessian-gap over steps with Ritz vectors kept)"
    rows = []
    for claim, var in (("thm2.2_alignment_excess", "alignment"), ("thm2.2_snapshot_alignment_excess",
                                                                  "alignment_snapshot")):
        src = "the Hessian batches' gradient" if var == "alignment" else "the snapshot store's gradient"
        row = Row(claim, PAPER["thm2.2"], f"mean of {var} - alignment_baseline at the last step ({var} = "
                  f"||U_k^T g|| / ||g|| for {src}; baseline sqrt(k/n) = a random k-dim subspace); mean over "
                  "batches, components, layers; CI: bootstrap over layers and batches; p: sign flips of the "
                  "per-layer means (one-sided)", 1)
        if al is None or var not in al:
            rows.append(_untestable(row, missing if al is None else f"hessian_alignment has no {var}"))
            continue
        diff, step = _last(_var(al, "hessian_alignment", var) - _var(al, "hessian_alignment",
                                                                         "alignment_baseline"))
        row.statistic += f"; step {step}" if step is not None else ""
        rows.append(_judge(row, s.run(cs.layer_mean, claim, _array(diff, claim, _DIMS[1:])), s, "layers"))
    a = None if al is None else _var(al, "hessian_alignment", "alignment")
    if a is not None and "step" not in a.dims:
        rows.insert(1, _untestable(Row("thm2.2_alignment_trend", PAPER["thm2.2"], "alignment rises over steps", 1),
                                   "hessian_alignment holds one step"))
    else:
        rows.insert(1, _trend_row("thm2.2_alignment_trend", "thm2.2", a, missing, "alignment ||U_k^T g|| / ||g||",
                                  1, s))
    return rows


# ------------------------------------------------------------------- Figure 1 and Section 2.4: across components
def _fig1_rows(gap: xr.Dataset | None, s: Settings) -> list[Row]:
    """Figure 1 (1) and (2), for the absolute and the relative gap (gap_values) at the last Hessian step.

    (1) effect = mean over {q,k,o,gate} − mean over {v,up,down} of the per-component mean over layers and
        batches (cs.component_difference; p: component labels permuted).
    (2) layers split into thirds (floor(L/3) early, floor(L/3) late, the rest middle); each component's gaps
        divided by its mean over layers; effect = mean over early+late layers − mean over middle layers
        (cs.depth_difference; p: layer labels permuted). Needs min_per_third layers per third, else not
        testable (with 6 layers, 2 per third, no permutation p could reach 0.05 anyway: C(6, 2) = 15)."""
    rows = []
    for kind, name in (("abs", "absolute gap lambda_k - lambda_{k+1}"), ("rel", "relative gap (lambda_k - "
                                                                                "lambda_{k+1}) / |lambda_1|")):
        a = Row(f"fig1a_{kind}_gap_by_component", PAPER["fig1a"], f"mean {name} of {{{','.join(CLEAR_GAP)}}} "
                f"minus that of {{{','.join(FLAT_GAP)}}} (per component: mean over layers and batches); CI: "
                "bootstrap over layers and batches; p: component labels permuted (one-sided). " + FIG1_GAP, 1)
        b = Row(f"fig1b_{kind}_gap_by_depth", PAPER["fig1b"], f"mean {name}, each component divided by its mean "
                f"over layers, of the first and last floor(L/3) layers minus that of the middle ones (1 = that "
                "component's mean); CI: bootstrap over layers within early/middle/late and over batches; p: layer "
                f"labels permuted (one-sided); needs >= {s.min_per_third} layers per third", 1)
        if gap is None:
            rows += [_untestable(a, "no hessian_gap group"), _untestable(b, "no hessian_gap group")]
            continue
        g, note = gap_values(gap, kind, s.certified_only)
        V = _array(g, "hessian_gap", _DIMS[1:])
        comps = [str(c) for c in g.component.values]
        in_a = np.array([c in CLEAR_GAP for c in comps])
        if not (in_a.any() and np.isin(comps, FLAT_GAP).any()):
            _untestable(a, f"components {comps} do not cover both groups")
        else:
            known = np.isin(comps, CLEAR_GAP + FLAT_GAP)
            _judge(a, s.run(cs.component_difference, a.claim, V[:, known], in_a[known]), s, "components")
        L, third = V.shape[0], V.shape[0] // 3
        if third < s.min_per_third:
            _untestable(b, f"{L} layers cannot separate early/late from middle: needs >= {3 * s.min_per_third} "
                        f"({s.min_per_third} per third)")
        else:
            outer = np.zeros(L, dtype=bool)
            outer[:third] = outer[L - third:] = True
            strata = [np.arange(third), np.arange(third, L - third), np.arange(L - third, L)]
            _judge(b, s.run(cs.depth_difference, b.claim, V, outer, strata), s, "layers")
        for r in (a, b):
            r.notes += [note] if note else []
        rows += [a, b]
    return rows[0::2] + rows[1::2]  # a abs, a rel, b abs, b rel


def _lowrank_values(spectrum: xr.Dataset | None, rank_map: dict | None, like: xr.DataArray
                    ) -> dict[str, tuple[xr.DataArray | None, str, str]]:
    """{name: ((layer, component) values on like's coordinates or None, definition, why missing)}; lower = more
    low-rank for each."""
    out: dict[str, tuple[xr.DataArray | None, str, str]] = {}
    on = dict(layer=like.layer.values, component=like.component.values)
    no_sp = "no spectrum group"
    sr = al = None
    if spectrum is not None:
        sr = (_last(_var(spectrum, "spectrum", "stable_rank"))[0] / _last(_var(spectrum, "spectrum", "full_rank"))[0])
        al = _last(_var(spectrum, "spectrum", "alpha"))[0]
    out["stable_rank"] = (None if sr is None else sr.reindex(on), "stable rank ||W||_F^2 / ||W||_2^2 divided by "
                          "min(out, in), at the spectrum's last step (lower = more low-rank)", no_sp)
    out["alpha"] = (None if al is None else al.reindex(on), "power-law exponent alpha of the singular-value "
                    "density at the spectrum's last step (lower = heavier tail = energy in fewer directions = "
                    "more low-rank, as in Section 2.5)", no_sp)
    kept = None
    if rank_map is not None:
        kept = xr.full_like(like.isel(batch=0, drop=True) if "batch" in like.dims else like, np.nan, dtype=float)
        for (layer, comp), e in map_entries(rank_map).items():
            if layer in on["layer"] and comp in list(on["component"]):
                kept.loc[dict(layer=layer, component=comp)] = int(e["rank"]) / int(e["full_rank"])
    out["welore_kept"] = (kept, f"kept rank fraction rank / full_rank of the rank map ({(rank_map or {}).get('method')}"
                          f", target err {(rank_map or {}).get('target_err')}; lower = more low-rank)", "no rank map")
    return out


def _correlation_rows(gap: xr.Dataset | None, spectrum: xr.Dataset | None, rank_map: dict | None,
                      grad: xr.Dataset | None, s: Settings) -> list[Row]:
    """Figure 1 (3) and Section 2.4: Spearman ρ over (layer, component) between the relative gap at the last Hessian
    step (mean over batches) and, one row each, the stable-rank fraction, α and WeLore's kept fraction (lower = more
    low-rank for all three: ρ < 0 supports), and the gradient-subspace stabilization step (stabilization_step;
    ρ < 0 supports: a clearer gap, an earlier step). cs.correlation: CI over layers and batches, p over pairings."""
    gname = "relative gap (lambda_k - lambda_{k+1}) / |lambda_1| at the last Hessian step (mean over batches)"
    tail = "; CI: bootstrap over layers (with all their components) and batches; p: pairings permuted (one-sided)"
    g, note = gap_values(gap, "rel", s.certified_only) if gap is not None else (None, "")
    V = _array(g, "hessian_gap", _DIMS[1:]) if g is not None else None
    rows = []
    targets = _lowrank_values(spectrum, rank_map, g) if g is not None else {
        k: (None, k, "") for k in ("stable_rank", "alpha", "welore_kept")}
    for name, (Y, definition, why) in targets.items():
        row = Row(f"fig1c_gap_vs_{name}", PAPER["fig1c"], f"Spearman rho between the {gname} and {definition}; "
                  f"the paper predicts rho < 0{tail}", -1)
        rows.append(_untestable(row, "no hessian_gap group" if g is None else why) if Y is None else
                    _judge(row, s.run(cs.correlation, row.claim, V, Y.transpose("layer", "component").values), s,
                           "(layer, component) pairs"))
    row = Row("sec2.4_gap_vs_stabilization_step", PAPER["sec2.4"], f"Spearman rho between the {gname} and the "
              f"stabilization step: the first step from which grad_subspace.overlap_prev stays >= tau = {s.tau} "
              "(never: censored, ranked after every component that stabilized); the paper predicts rho < 0"
              + tail, -1)
    if g is None or grad is None:
        rows.append(_untestable(row, "no hessian_gap group" if g is None else "no grad_subspace group"))
    else:
        op = _var(grad, "grad_subspace", "overlap_prev")
        if "step" not in op.dims or op.sizes["step"] < 3:
            rows.append(_untestable(row, "grad_subspace needs >= 3 snapshot steps"))
        else:
            st = stabilization_step(op, s.tau).reindex(layer=g.layer.values, component=g.component.values)
            _judge(row, s.run(cs.correlation, row.claim, V, st.transpose("layer", "component").values), s,
                   "(layer, component) pairs")
            cens, done = int(np.isinf(st.values).sum()), int(np.isfinite(st.values).sum())
            row.notes += [f"{cens} of {cens + done} censored (never >= tau)"] if cens + done else []
            rows.append(row)
    for r in rows:
        r.notes += [note] if note else []
    return rows


# --------------------------------------------------------------------------- Figure 4: finetuning
def _finetune_rows(results: list[dict] | None, s: Settings) -> list[Row]:
    """WeLore (LRC-only) finetuning vs full finetuning after the same steps: effect = eval ppl(welore) / ppl(full)
    = exp(mean over paired eval windows of the loss difference); supported when its CI lies below 1 + tolerance
    (non-inferiority), contradicted when above; without per-window losses the ratio has no CI: inconclusive."""
    stat = ("eval perplexity of welore / that of full finetuning after the same steps; the paper's side: < 1 + "
            f"tolerance = {1 + s.tolerance:g} (welore at most {s.tolerance:.0%} worse); CI: bootstrap over the "
            "paired eval windows (eval_window_losses); p: sign flips of the per-window log-perplexity "
            "differences minus log(1 + tolerance) (one-sided)")
    base = Row("fig4_welore_vs_full_ppl", PAPER["fig4"], stat, -1, 1 + s.tolerance)
    results = [results] if isinstance(results, dict) else list(results or [])
    full = [r for r in results if r.get("method") == "full"]
    welore = [r for r in results if r.get("method") == "welore"]
    if not full or not welore:
        have = sorted({str(r.get("method")) for r in results})
        return [_untestable(base, f"needs a welore and a full finetune result (have: {', '.join(have) or 'none'})")]
    if len(full) > 1:
        raise SpectraError(f"{len(full)} full-finetuning results given; pass the one to compare with")
    f, rows = full[0], []
    for w in welore:
        tag = f"_err{round(100 * w['err']):02d}" if len(welore) > 1 and w.get("err") is not None else ""
        row = Row(base.claim + tag, base.paper, base.statistic, -1, base.null)
        rows.append(row)
        if w.get("steps") != f.get("steps"):
            _untestable(row, f"welore ran {w.get('steps')} steps, full {f.get('steps')}: not comparable")
            continue
        lw, lf = w.get("eval_window_losses"), f.get("eval_window_losses")
        if lw is not None and lf is not None and len(lw) == len(lf):
            shift = math.log1p(s.tolerance)
            est = s.run(cs.paired_difference, row.claim, np.asarray(lw, float) - shift, np.asarray(lf, float))
            est.effect, est.ci_low, est.ci_high = (math.exp(v + shift) for v in (est.effect, est.ci_low,
                                                                                    est.ci_high))
            _judge(row, est, s, "eval windows", layers=False)
        elif all(r.get("eval_ppl") is not None for r in (w, f)):
            row.effect = w["eval_ppl"] / f["eval_ppl"]
            row.verdict = INCONCLUSIVE
            row.why = ("the results store no per-window eval losses (eval_window_losses), so the ratio carries no CI"
                       if lw is None or lf is None else
                       f"welore and full scored {len(lw)} and {len(lf)} eval windows: no paired CI")
        else:
            _untestable(row, "a result has no eval_ppl (finetune without validation windows)")
    return rows


# --------------------------------------------------------------------------- all claims
def claims(hessian_gap: xr.Dataset | None = None, hessian_drift: xr.Dataset | None = None,
           hessian_alignment: xr.Dataset | None = None, grad_subspace: xr.Dataset | None = None,
           spectrum: xr.Dataset | None = None, rank_map: dict | None = None, finetune: list[dict] | None = None,
           *, seed: int = 0, n_boot: int = 2000, n_perm: int = 2000, tau: float = 0.9, alpha: float = 0.05,
           min_n: int = 4, tolerance: float = 0.05, min_per_third: int = 3, certified_only: bool = True
           ) -> xr.Dataset:
    """Every claim of the WeLore paper's theory as a row of a Dataset with dim `claim` (see the module docstring
    for the verdict rules; each row's `statistic` states its definition).

    Inputs: the analysis groups of one run (hessian_gap with or without `step`; hessian_drift and
    hessian_alignment over steps; grad_subspace; spectrum), a rank map (WeLore's kept fraction) and finetune
    metrics dicts (spectra finetune's metrics.json: method, steps, eval_loss, optionally eval_window_losses).
    Settings: seed of the resampling, n_boot bootstrap resamples, n_perm permutations (all of them when there
    are fewer), tau the gradient-subspace overlap threshold, alpha (CI level 1 − alpha), min_n the fewest
    units for a verdict, tolerance the Figure 4 perplexity margin, min_per_third the fewest layers per depth
    third, certified_only to leave out gaps whose eigenvalues failed the Lanczos certificate."""
    s = Settings(seed, n_boot, n_perm, tau, alpha, min_n, tolerance, min_per_third, certified_only)
    rows = [*_stabilization_rows(hessian_drift, hessian_gap, s), *_alignment_rows(hessian_alignment, s),
            *_fig1_rows(hessian_gap, s), *_correlation_rows(hessian_gap, spectrum, rank_map, grad_subspace, s),
            *_finetune_rows(finetune, s)]
    return claims_dataset(rows, s)


def claims_dataset(rows: list[Row], s: Settings) -> xr.Dataset:
    """The `claims` group: one row per claim, with self-describing attrs."""
    col = lambda name, dtype: np.array([getattr(r, name) for r in rows], dtype=dtype)  # noqa: E731
    text = lambda name: np.array([getattr(r, name) for r in rows], dtype=object)  # noqa: E731
    why = np.array(["; ".join([r.why, *r.notes]) for r in rows], dtype=object)
    ds = xr.Dataset(
        {**{k: ("claim", col(k, float)) for k in ("effect", "ci_low", "ci_high", "p_value", "p_opposite", "null")},
         **{k: ("claim", col(k, np.int64)) for k in ("n", "n_units", "direction")},
         **{k: ("claim", text(k)) for k in ("verdict", "statistic", "paper")}, "why": ("claim", why)},
        coords={"claim": np.array([r.claim for r in rows], dtype=object)},
    )
    ds.attrs.update(seed=s.seed, n_boot=s.n_boot, n_perm=s.n_perm, tau=s.tau, alpha=s.alpha, min_n=s.min_n,
                    tolerance=s.tolerance, min_per_third=s.min_per_third, certified_only=int(s.certified_only),
                    ci_level=s.level, verdict_rules=VERDICT_RULES, figure_1_gap=FIG1_GAP,
                    clear_gap_components=list(CLEAR_GAP), flat_gap_components=list(FLAT_GAP))
    return ds
