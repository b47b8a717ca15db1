"""`spectra claims RUN`: the paper's claims as statistics with uncertainty and verdicts (spectra.analysis.claims)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spectra.cli.args import OutputArgs, SeedArgs
from spectra.cli.options import command_from
from spectra.config import opt

DOC = """What the WeLore paper claims, and what this run shows: one row per claim with effect, CI, p, n, verdict.

Theorem 2.1 (eigenvalues and top eigenspace stabilize: needs hessian-gap over several steps), Theorem 2.2
(gradient aligned with the top Hessian eigenspace), Figure 1 (q,k,o,gate vs v,up,down gaps; early/late vs
middle layers; gap vs low-rankness), Section 2.4 (gap vs gradient-subspace stabilization) and Figure 4
(WeLore-PEFT vs full finetuning). A claim whose inputs are missing, or too few to carry a verdict, says
"not testable here" and why. Reads the run's analysis store, its welore rank map and finetune results;
writes the `claims` group of the analysis store (or --out) and prints the table.
"""


@dataclass
class ClaimsArgs(OutputArgs, SeedArgs):
    analysis: Optional[str] = opt(None, "Analysis store to read (default: <run>/analysis.zarr).")
    rank_map: Optional[str] = opt(None, "Rank map for WeLore's kept fraction (default: the run's welore map "
                                        "nearest 50% ERR).")
    n_boot: int = opt(2000, "Bootstrap resamples per CI.", min=100, max=1_000_000)
    n_perm: int = opt(2000, "Permutations per p-value (all of them when there are fewer).", min=100, max=1_000_000)
    tau: float = opt(0.9, "Gradient-subspace overlap a component must keep to count as stabilized.", min=1e-6,
                     max=1.0)
    alpha: float = opt(0.05, "Significance level; CIs are (1 - alpha).", min=1e-6, max=0.49)
    min_n: int = opt(4, "Fewest units (steps, layers, components, windows) for a verdict.", min=3, max=1_000_000)
    tolerance: float = opt(0.05, "Figure 4: WeLore may be this much worse than full finetuning (ppl ratio).",
                           min=0.0, max=10.0)


def run(args: ClaimsArgs, path: str) -> None:
    from pathlib import Path

    from spectra.analysis.claims_inputs import run_claims
    from spectra.io.analysis_store import write_analysis
    from spectra.io.sources import resolve

    src = resolve(path)
    store = Path(args.analysis) if args.analysis else src.analysis_store
    ds = run_claims(store, src.run_dir, rank_map=args.rank_map, seed=args.seed, n_boot=args.n_boot,
                    n_perm=args.n_perm, tau=args.tau, alpha=args.alpha, min_n=args.min_n, tolerance=args.tolerance)
    dest = write_analysis(Path(args.out) if args.out else store, "claims", ds)
    print_claims(ds)
    print(f"wrote claims to {dest}")


def print_claims(ds) -> None:
    """The claims table: claim, effect [CI], p, n, verdict; then why for every row that is not supported."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="What the paper claims - what this run shows", show_lines=False)
    for col in ("claim", "effect [CI]", "p", "n", "verdict"):
        t.add_column(col)
    for c in ds["claim"].values:
        r = ds.sel(claim=c)
        eff, lo, hi, p = (float(r[k]) for k in ("effect", "ci_low", "ci_high", "p_value"))
        ci = f" [{lo:.3g}, {hi:.3g}]" if lo == lo and hi == hi else ""
        t.add_row(str(c), (f"{eff:.3g}" if eff == eff else "-") + ci, f"{p:.3g}" if p == p else "-",
                  str(int(r["n"])), str(r["verdict"].item()))
    console = Console(width=None if Console().is_terminal else 200)
    console.print(t)
    for c in ds["claim"].values:
        r = ds.sel(claim=c)
        if r["verdict"].item() != "supported" and r["why"].item():
            print(f"{c}: {r['verdict'].item()}: {r['why'].item()}")


command = command_from(ClaimsArgs, run, DOC, inputs="one",
                       input_help="The run folder (runs/<id>), or anything inside it, or an analysis store's folder.")
