"""The finetuning recipe every method shares (`FinetuneConfig`): a typed config, checked by the same rules
from Python, `--config` files and the command line (spectra/config.py). No torch here, so `spectra finetune
--help` can build its options from these fields without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.config import opt, validate
from spectra.errors import SpectraError

METHODS = ("welore", "lora", "galore", "full")
# Defaults for the tiny..350m models spectra pretrains (trained at lr 1e-3): a tenth of that for
# continual finetuning; LoRA starts from a zero update (B=0), so it needs a 10x larger step.
# WeLore's 7B recipe uses 5e-5; pass lr to reproduce it.
DEFAULT_LR = {"welore": 1e-4, "lora": 1e-3, "galore": 1e-4, "full": 1e-4}


@dataclass
class FinetuneConfig:
    """The training recipe shared by every method (same data, steps, AdamW, warmup + cosine schedule)."""

    method: Literal["welore", "lora", "galore", "full"] = opt(
        "welore", "What trains: welore (LRC factors only), lora, galore or full (every parameter).")
    steps: int = opt(1000, "Optimizer steps (identical for every method)", min=1)
    lr: Optional[float] = opt(None, "Peak learning rate; default 1e-4 (welore, galore, full), 1e-3 (lora)",
                              min=0.0, max=10.0)
    batch_size: int = opt(16, "Sequences per optimizer step", min=1)
    micro_batch: int = opt(16, "Sequences per forward pass (gradient accumulation up to the batch size)", min=1)
    warmup: int = opt(100, "Linear warmup steps before the cosine decay (clamped to the steps)", min=0)
    min_lr_ratio: float = opt(0.1, "The cosine decays to this fraction of the peak lr (GaLore's schedule)",
                              min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(1.0, "Max gradient norm (0: off)", min=0.0)
    lora_rank: int = opt(8, "LoRA adapter rank", min=1)
    lora_alpha: Optional[int] = opt(None, "LoRA alpha (default: 2 x the LoRA rank)", min=1)
    galore_rank: int = opt(128, "GaLore projection rank (clamped to each matrix's size)", min=1)
    galore_gap: int = opt(200, "GaLore: steps between projector SVD refreshes", min=1)
    galore_scale: float = opt(0.25, "GaLore: scale of the projected-back update", min=0.0)
    dtype: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "Auto (bf16 autocast on GPU, fp32 on CPU), bf16 (autocast, CPU too: fast with AVX512-BF16/AMX; "
                "fp32 master weights either way) or fp32. Evaluations stay fp32 on CPU")
    chunked_loss: bool = opt(True, "lm_head + CE in token chunks (spectra.lm.loss): no [tokens, vocab] logits kept",
                             cli=False)

    def __post_init__(self):
        validate(self)  # types, ranges and choices: one line naming the field
        if self.batch_size % self.micro_batch:
            raise SpectraError(f"--batch-size must be a positive multiple of --micro-batch "
                               f"(got {self.batch_size}, {self.micro_batch})")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.lr <= 0:
            raise SpectraError(f"--lr must be > 0, not {self.lr}")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        self.warmup = min(self.warmup, self.steps)  # past the last step the peak lr would never be reached
