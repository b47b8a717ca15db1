"""The recipe's settings: LLaMA model configs matching GaLore's (jiaweizzhao/GaLore configs/llama_*.json, plus
`micro`/`tiny` for tests) and `PretrainConfig`, every setting of a run (also the `spectra pretrain` options).

Every config builds a Hugging Face `LlamaForCausalLM` (`--objective clm`) or, with `--objective mlm`, a
`BertForMaskedLM` encoder of the same hidden size, heads and layers (BERT's 4 x hidden MLP, GELU, learned
positions for exactly --seq-len tokens), so checkpoints are ordinary `save_pretrained` folders
(safetensors) that any HF tool, and every spectra analyzer, can read. BERT rather than RoBERTa: the
WordPiece tokenizer it is defined with is the one the issue's downstream encoder uses, and its position ids
start at 0 (RoBERTa's are offset by the pad id, a trap for a positions check).
No torch at import: `spectra pretrain --help` builds its options from `PretrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, Optional

from spectra.cli.args import DataArgs, DeviceArgs, OverwriteArgs, SeedArgs, TokenizerArgs
from spectra.config import opt, validate
from spectra.errors import SpectraError

if TYPE_CHECKING:  # transformers takes seconds to import; keep `spectra --help` fast
    from transformers import BertConfig, LlamaConfig, PreTrainedModel


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    heads: int
    layers: int


# name -> (hidden, intermediate, heads, layers); GaLore's table, vocab 32000 there.
SIZES: dict[str, ModelSize] = {
    "micro": ModelSize(32, 88, 2, 1),  # fault-injection tests: 1 layer, the fewest files per snapshot
    "tiny": ModelSize(64, 176, 4, 2),  # tests: 2 layers, dim 64, runs in seconds on CPU
    "9m": ModelSize(128, 352, 4, 4),
    "20m": ModelSize(256, 688, 4, 4),
    "35m": ModelSize(384, 1024, 8, 6),
    "60m": ModelSize(512, 1376, 8, 8),
    "130m": ModelSize(768, 2048, 12, 12),
    "350m": ModelSize(1024, 2736, 16, 24),
    "1b": ModelSize(2048, 5461, 32, 24),
    "7b": ModelSize(4096, 11008, 32, 32),
}

MODEL_NAMES = tuple(SIZES)  # Literal[MODEL_NAMES] lists them in --help
MAX_POSITIONS = 1024  # GaLore's max_sequence_length; training uses 256


def vocab_for(tokenizer_len: int) -> int:
    """Embedding rows for a tokenizer: GaLore uses 32000 for T5's 32100 ids (the 100 sentinel
    ids never occur in plain text); we round the real length up to a multiple of 64 instead, so
    no id can ever index out of range and the matmuls stay tensor-core friendly."""
    return (tokenizer_len + 63) // 64 * 64


def llama_config(name: str, vocab_size: int = 32000, attn_implementation: str = "sdpa") -> LlamaConfig:
    """The `LlamaConfig` for one of `SIZES` (raises KeyError with the valid names otherwise)."""
    from transformers import LlamaConfig

    if name not in SIZES:
        raise KeyError(f"unknown model config {name!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[name]
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        num_hidden_layers=s.layers,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=0,
        pad_token_id=0,
        eos_token_id=1,  # T5: </s> = 1, pad = 0
    )
    cfg._attn_implementation = attn_implementation
    cfg.spectra_size = name
    cfg.spectra_sizes = asdict(s)
    return cfg


def bert_config(name: str, vocab_size: int, max_positions: int, attn_implementation: str = "sdpa") -> BertConfig:
    """The `BertConfig` of an encoder with the hidden size, heads and layers of `SIZES[name]` (BERT's 4 x hidden
    GELU MLP) and learned positions for `max_positions` tokens (longer windows are refused, not extrapolated)."""
    from transformers import BertConfig

    if name not in SIZES:
        raise KeyError(f"unknown model config {name!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[name]
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
                     num_attention_heads=s.heads, intermediate_size=4 * s.hidden, hidden_act="gelu",
                     max_position_embeddings=max_positions, type_vocab_size=2, initializer_range=0.02,
                     tie_word_embeddings=True)
    cfg._attn_implementation = attn_implementation
    cfg.spectra_size = name
    return cfg


def build_model(
    name: str, vocab_size: int = 32000, seed: int = 0, attn_implementation: str = "sdpa", *,
    objective: str = "clm", max_positions: int = MAX_POSITIONS,
) -> PreTrainedModel:
    """A freshly initialised, seeded LLaMA (`objective` clm) or BERT MLM encoder (mlm, positions for
    `max_positions` tokens) of size `name` (float32 parameters)."""
    import torch
    from transformers import BertForMaskedLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if objective == "mlm":
        return BertForMaskedLM(bert_config(name, vocab_size, max_positions, attn_implementation))
    return LlamaForCausalLM(llama_config(name, vocab_size, attn_implementation))


DEFAULT_TOKENIZER = "t5-base"  # GaLore's


@dataclass
class PretrainConfig(OverwriteArgs, SeedArgs, DeviceArgs, TokenizerArgs, DataArgs):
    """Every setting of a pretraining run; each field is also a `spectra pretrain` option. The shared groups
    give --data, --tokenizer (default: the run's on --resume, else t5-base), --device, --seed, --overwrite.
    A config that exists is valid: the constructor checks every field as the command line does."""

    model: Literal[MODEL_NAMES] = opt("130m", "Model size (GaLore's LLaMA table; micro/tiny for tests).")
    objective: Literal["clm", "mlm"] = opt("clm", "clm: a LLaMA trained on next tokens; mlm: a BERT encoder of the "
                                                  "same size trained by masked-language modelling (15% masked).")
    wordpiece_vocab: int = opt(8192, "--objective mlm without --tokenizer: the size of the WordPiece vocabulary "
                                     "trained on --data (cached in .cache/spectra).", min=6)
    val_data: Optional[str] = opt(None, "Validation files (default: hold out --val-fraction of --data).")
    val_fraction: float = opt(0.01, "Fraction of --data documents held out for validation, in (0, 1).",
                              min=0.0, max=1.0)
    seq_len: int = opt(256, f"Tokens per sequence (at most the model's {MAX_POSITIONS} positions).", min=1,
                       max=MAX_POSITIONS)
    batch_size: int = opt(512, "Sequences per optimizer step, across all ranks.", min=1)
    micro_batch: int = opt(128, "Sequences per forward/backward on one rank.", min=1)
    steps: int = opt(20000, "Optimizer steps.", min=1)
    lr: float = opt(1e-3, "Peak learning rate (AdamW).", min=0.0, max=10.0)
    warmup: int = opt(2000, "Linear warmup steps (clamped to 10% of --steps for short runs).", min=0)
    min_lr_ratio: float = opt(0.1, "Cosine decays to this fraction of --lr.", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay (GaLore uses none).", min=0.0)
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas, e.g. 0.9,0.95.")
    grad_clip: float = opt(1.0, "Max gradient norm (0: off).", min=0.0)
    eval_every: int = opt(1000, "Validate every N steps and at the last (0: never).", min=0)
    val_tokens: int = opt(1_048_576, "Fixed validation budget in tokens (the same windows every time).", min=1)
    save_every: int = opt(1000, "Checkpoint every N steps and at the last (0: never).", min=0)
    keep_checkpoints: int = opt(3, "Newest checkpoints kept (0: all).", min=0)
    snapshot_every: int = opt(1000, "Snapshot weights+grads every N steps, plus step 0 and the last (0: none).",
                              min=0)
    snapshot_steps: list[int] = opt([], "Explicit comma-separated snapshot steps, e.g. 0,100,1000 "
                                        "(overrides --snapshot-every).")
    snapshot_grad: Literal["full", "sketch", "none"] = opt("sketch", "Gradient in snapshots: full, top-r SVD "
                                                                     "sketch, or none.")
    sketch_rank: int = opt(32, "r of the gradient sketch.", min=1)
    snapshot_embeddings: bool = opt(False, "Also snapshot embed_tokens and lm_head.")
    strategy: Literal["ddp", "fsdp"] = opt("ddp", "Multi-process engine: ddp (every rank holds the whole model "
                                                  "and optimizer; fastest while they fit one device) or fsdp "
                                                  "(FSDP2: parameters, gradients and AdamW state sharded over "
                                                  "ranks; pick it when they do not fit, from ~1B parameters on "
                                                  "80 GB). fsdp checkpoints are sharded (torch.distributed."
                                                  "checkpoint) plus a save_pretrained copy.")
    compile: bool = opt(False, "torch.compile the model (faster steps, ~30 s to start; bench/README.md).")
    cpu_bf16: Optional[bool] = opt(None, "bf16 autocast on CPU (default: on where the CPU has native bf16, "
                                         "off elsewhere; bench/README.md compares the loss curves).")
    runs_dir: str = opt("runs", "Parent folder of runs.")
    run_id: Optional[str] = opt(None, "Run folder name: letters, digits, . _ - (default: <model>-<timestamp>).")
    resume: bool = opt(False, "Continue runs/<run-id> from its latest checkpoint.")
    allow_config_change: bool = opt(False, "Let --resume change lr, data, seed, batch, ... (recorded in "
                                           "run_config.json).")
    log_to: Literal["none", "tensorboard", "wandb"] = opt("none", "Also mirror the metrics to TensorBoard "
                                                                  "(<run>/tensorboard) or W&B.")

    def __post_init__(self) -> None:
        validate(self)  # types, ranges and choices, as from the command line
        check(self)

    def snapshot_at(self, step: int) -> bool:
        if self.snapshot_steps:
            return step in self.snapshot_steps
        return self.snapshot_every > 0 and (step % self.snapshot_every == 0 or step == self.steps)


def check(cfg: PretrainConfig) -> None:
    """Cross-field checks the per-option ranges cannot express (one error line each)."""
    if cfg.lr <= 0:
        raise SpectraError(f"--lr must be > 0, not {cfg.lr}")
    if not 0 < cfg.val_fraction < 1:
        raise SpectraError(f"--val-fraction must be in (0, 1), not {cfg.val_fraction}")
    if any(s < 0 or s > cfg.steps for s in cfg.snapshot_steps):
        raise SpectraError(f"--snapshot-steps must lie in 0..{cfg.steps}, got {list(cfg.snapshot_steps)}")
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "val_fraction"):
        if not math.isfinite(getattr(cfg, name)):
            raise SpectraError(f"--{name.replace('_', '-')} must be a finite number")
    if cfg.batch_size % cfg.micro_batch:
        raise SpectraError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.resume and not cfg.run_id:
        raise SpectraError("--resume needs --run-id naming the run to continue")
    if cfg.objective == "mlm" and not cfg.tokenizer and not cfg.data and not cfg.resume:
        raise SpectraError("--objective mlm trains its WordPiece vocabulary on --data; pass --data FILES or "
                           "--tokenizer (a folder with a [MASK] token)")
    if cfg.resume and cfg.overwrite:
        raise SpectraError("--resume and --overwrite exclude each other")
