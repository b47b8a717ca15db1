"""`spectra spectrum`: singular values and heavy-tail metrics of every decoder linear, per step
(spectra.analysis.spectrum.spectrum), written as group `spectrum` of the analysis store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spectra.cli.args import DeviceArgs, InputArgs, OutputArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class SpectrumArgs(InputArgs, DeviceArgs, OutputArgs):
    steps: Optional[list[int]] = opt(None, "Snapshot steps to analyze (default: all), e.g. 4,12; for checkpoint "
                                           "folders, the training step of each folder in order (default: from "
                                           "their names, step1000 / step_1000).",
                                     min=0, flag=("--steps", "--snapshot-steps"))
    top_r: int = opt(32, "r for energy_top_r, the share of ||W||_F^2 in the top-r singular directions.", min=1,
                     max=1_000_000)


def run(args: SpectrumArgs, paths: list[str]) -> None:
    from spectra.analysis.spectrum import spectrum
    from spectra.io.analysis_store import write_analysis
    from spectra.io.sources import resolve

    source = resolve(paths, steps=args.steps)
    ds = spectrum(source, steps=None if source.kind == "series" else args.steps, top_r=args.top_r,
                  device=args.device)
    dest = write_analysis(args.out or source.analysis_store, "spectrum", ds)
    print_spectrum_table(ds)
    print(f"wrote group 'spectrum' to {dest}")


def print_spectrum_table(ds) -> None:
    """Per component (mean over layers): first -> final step for the headline metrics."""
    from rich.console import Console
    from rich.table import Table

    first, last = ds.isel(step=0), ds.isel(step=-1)
    span = f"step {int(first.step)}→{int(last.step)}" if ds.sizes["step"] > 1 else f"step {int(last.step)}"
    t = Table(title=f"spectrum ({span}, mean over {ds.sizes['layer']} layers)")
    for col in ("component", "full rank", "stable rank", "eff. rank", "alpha", f"energy top-{ds.attrs['top_r']}"):
        t.add_column(col, justify="right" if col != "component" else "left", no_wrap=True)

    def cell(name: str, c: str, fmt: str) -> str:
        a, b = float(first[name].sel(component=c).mean()), float(last[name].sel(component=c).mean())
        return f"{b:{fmt}}" if ds.sizes["step"] == 1 else f"{a:{fmt}}→{b:{fmt}}"

    for c in ds.component.values:
        t.add_row(
            str(c),
            f"{float(last.full_rank.sel(component=c).mean()):.0f}",
            cell("stable_rank", c, ".1f"),
            cell("effective_rank", c, ".1f"),
            cell("alpha", c, ".2f"),
            cell("energy_top_r", c, ".3f"),
        )
    Console(width=max(120, Console().width)).print(t)  # a log file gets whole values, not "0.01…"


command = command_from(
    SpectrumArgs, run,
    """Singular values and heavy-tail metrics (stable/effective rank, energy, power-law alpha) of every decoder linear.

    For each layer x q/k/v/o/gate/up/down and each snapshot step (or checkpoint of a series):
    sigma, WeLore's min-max normalized sigma, stable rank, effective rank, energy in the top-r
    directions and the weightwatcher power-law alpha (MLE, x_min by KS distance). Any supported
    architecture (spectra.models.components). PATHS: a run folder or its snapshots.zarr (every snapshot
    step); one checkpoint folder or hub name; or several, or a quoted glob ('pythia/step*',
    EleutherAI/pythia-160m@step1000 ...): a checkpoint series of one model, read one checkpoint at a time.
    A compressed folder is refused (`spectra compress --merge` it first). Writes group `spectrum` of the
    analysis store (default: <run>/analysis.zarr; a series: its run's or <common folder>/analysis.zarr; a
    checkpoint: <checkpoint>/analysis.zarr) and prints how the metrics moved from the first to the last step.
    """,
    inputs="many",
)
