"""`spectra grad-subspace`: gradient-subspace stabilization across a run's snapshots
(spectra.analysis.subspace.grad_subspace), written as group `grad_subspace` of the analysis store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spectra.cli.args import DeviceArgs, InputArgs, OutputArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class GradSubspaceArgs(InputArgs, DeviceArgs, OutputArgs):
    rank: int = opt(8, "r: dimension of the compared top-r gradient / weight singular subspaces.", min=1,
                    max=1_000_000)
    side: Literal["left", "right"] = opt("left", "left (output-space, U) or right (input-space, V) singular "
                                                 "vectors.")


def run(args: GradSubspaceArgs, path: str) -> None:
    from spectra.analysis.subspace import grad_subspace
    from spectra.io.analysis_store import write_analysis
    from spectra.io.sources import resolve

    source = resolve(path)
    ds = grad_subspace(source, rank=args.rank, side=args.side, device=args.device)
    dest = write_analysis(args.out or source.analysis_store, "grad_subspace", ds)
    print_subspace_table(ds)
    print(f"wrote group 'grad_subspace' to {dest}")


def print_subspace_table(ds) -> None:
    """Per component (mean over layers): how settled the gradient subspace is."""
    from rich.console import Console
    from rich.table import Table

    first, last = ds.isel(step=0), ds.isel(step=-1)
    t = Table(
        title=f"gradient-subspace overlap, rank {ds.attrs['rank']} ({ds.attrs['side']}), "
        f"steps {int(first.step)}..{int(last.step)}, mean over {ds.sizes['layer']} layers"
    )
    for col in ("component", "prev, last step", "prev, mean", "final, first step", "grad energy in W top-r"):
        t.add_column(col, justify="left" if col == "component" else "right", no_wrap=True)
    for c in ds.component.values:
        sel = ds.sel(component=c)
        e0, e1 = (
            float(sel.energy_in_weight_subspace.isel(step=0).mean()),
            float(sel.energy_in_weight_subspace.isel(step=-1).mean()),
        )
        t.add_row(
            str(c),
            f"{float(sel.overlap_prev.isel(step=-1).mean()):.3f}",
            f"{float(sel.overlap_prev.mean(skipna=True)):.3f}",
            f"{float(sel.overlap_final.isel(step=0).mean()):.3f}",
            f"{e0:.3f}→{e1:.3f}",
        )
    Console(width=max(120, Console().width)).print(t)  # a log file gets whole values, not "0.01…"


command = command_from(
    GradSubspaceArgs, run,
    """Gradient-subspace stabilization across snapshots: overlap with the previous and final top-r subspace.

    Per decoder linear and snapshot step: overlap ||P_t^T P_s||_F^2 / r of the top-r gradient
    singular subspaces with the previous and with the final snapshot, principal angles and
    Grassmann distance to the previous one, and the share of gradient energy inside the weight's
    own top-r subspace. PATH: a run folder or its snapshots.zarr with gradients (full or sketch).
    Writes group `grad_subspace` of the analysis store (default: <run>/analysis.zarr).
    """,
    inputs="one",
    input_help="A run folder or its snapshots.zarr with gradients (full or sketch).",
)
