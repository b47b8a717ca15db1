"""What every report figure shares: colours per method, and the conversions from stored values to
what Plotly and the page show (escaped strings, NaN as a gap, "–" for a missing number)."""

from __future__ import annotations

import html
import math

import numpy as np
import xarray as xr

from spectra.io.variables import attrs_for

GREEN, RED = "rgba(44,160,44,{a})", "rgba(214,39,40,{a})"
# one colour family per method, the same in every figure: (dark, light) -- the light shade is the
# method's second dataset (ColorBrewer "Paired"; grey for the dense / full-finetuning reference)
METHOD_COLORS = {"welore": ("#33a02c", "#b2df8a"), "uniform": ("#1f78b4", "#a6cee3"),
                 "diagnostic": ("#6a3d9a", "#cab2d6"),
                 "energy": ("#8c510a", "#d8b365"), "loss-whitened": ("#b2182b", "#ef8a62"),
                 "dense": ("#444444", "#aaaaaa"), "full": ("#444444", "#aaaaaa"),
                 "lora": ("#ff7f00", "#fdbf6f"), "galore": ("#e31a1c", "#fb9a99")}
SPARE_COLORS = [("#b15928", "#dfc27d"), ("#01665e", "#80cdc1"), ("#c51b7d", "#f1b6da")]
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def esc(s) -> str:
    return html.escape(str(s))


def finite(a) -> list:
    """Values for JSON: NaN/inf become None so Plotly draws a gap instead of failing."""
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in np.asarray(a, float).ravel()]


def fmt(v, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def pct(v, spec: str = ".1%") -> str:
    """A fraction as a percentage ("50.0%"), "–" for a missing one."""
    return fmt(v, spec)


def num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def long_name(da: xr.DataArray, name: str | None = None) -> str:
    """The variable's `long_name` attribute (else the spectra.io.variables entry of its name)."""
    return str(da.attrs.get("long_name") or attrs_for(name or str(da.name))["long_name"])


def label(da: xr.DataArray, name: str | None = None) -> str:
    """An axis title from the variable's own `long_name` and `units` (spectra.io.variables puts them on
    every stored variable; a Dataset built in memory without them falls back to the same table), never
    its snake_case name: "stable rank (count)", "power-law exponent" (units "1" are left unsaid)."""
    units = str(da.attrs.get("units", attrs_for(name or str(da.name))["units"]) or "")
    text = long_name(da, name)
    return f"{text} ({units})" if units not in ("", "1") else text
