"""`spectra pipeline`: the whole WeLore pipeline from an embedded preset (pretrain/pipeline.py, over the API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.cli.args import DeviceArgs
from spectra.cli.options import command_from
from spectra.config import opt

# pretrain/presets.py holds them; repeated here only as the closed choice --help lists without importing it
# (tests/test_cli.py checks the two agree)
Preset = Literal["quickstart", "cpu-reference", "cpu-bytes", "130m"]


@dataclass
class PipelineArgs(DeviceArgs):
    preset: Preset = opt("quickstart", "Embedded configuration (pretrain/presets.py): quickstart runs in a few CPU "
                                       "minutes, cpu-reference / cpu-bytes in about 15, 130m is the GPU run.")
    runs_dir: str = opt("runs", "Parent folder of runs.")
    run_id: Optional[str] = opt(None, "Run folder name (default: <preset>-<timestamp>).")
    steps: Optional[int] = opt(None, "Override the preset's pretraining steps.", min=1, max=10_000_000)
    skip_pretrain: bool = opt(False, "Reuse the run's existing checkpoints and snapshots.")


def run(a: PipelineArgs) -> None:
    from pretrain.pipeline import run_pipeline
    from spectra.io.runs import validate_run_id

    if a.run_id is not None:
        validate_run_id(a.run_id)
    run_pipeline(a.preset, a.runs_dir, a.run_id, a.steps, a.device, a.skip_pretrain, log=lambda s: print(s, flush=True))


command = command_from(
    PipelineArgs, run,
    """Run the whole WeLore pipeline (pretrain, analyze, rank, compress, eval, finetune, claims, report) from a preset.

    Stages: pretrain with snapshots -> spectrum, grad-subspace, hessian-gap at every checkpoint -> WeLore,
    uniform, energy and loss-whitened rank maps at the preset's ERRs -> compressed folders and their perplexity
    on Wikipedia and C4 -> WeLore-PEFT vs LoRA vs GaLore vs full finetuning -> the paper's claims -> report.html.
    Everything lands in runs/<run-id>/ (see the README's data path).""",
)
