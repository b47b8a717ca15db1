"""`spectra report RUN`: parse, build the page (reports.build.write_report), print where it went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spectra.cli.args import OutputArgs
from spectra.cli.options import command_from
from spectra.config import opt

DOC = """Interactive offline HTML report of a run: the paper figures 1-7 and Table 1.

Plotly figures of Hessian gaps, gradient-subspace overlap, normalized spectra with the WeLore
threshold, heavy-tail metrics, rank maps, perplexity vs ERR and finetuning cost. Sections whose
inputs are not computed yet say which command makes them; plotly.js is embedded once
(compressed), so the file opens without network. Building twice gives identical bytes.
--out defaults to RUN/report.html; an existing file there is replaced only if it is a spectra report.
"""


@dataclass
class ReportArgs(OutputArgs):
    title: Optional[str] = opt(None, "Report title (default: the run folder's name).")


def run(args: ReportArgs, path: str) -> None:
    from reports.build import write_report

    print(write_report(path, out=args.out, title=args.title))


command = command_from(ReportArgs, run, DOC, inputs="one",
                       input_help="The run folder (runs/<id>), or a checkpoint, compressed model or snapshots.zarr "
                                  "inside it.")
