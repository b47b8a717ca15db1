"""LLaMA model configs matching GaLore's (jiaweizzhao/GaLore configs/llama_*.json), plus `tiny` for tests.

Every config builds a Hugging Face `LlamaForCausalLM`, so checkpoints are ordinary
`save_pretrained` folders (safetensors) that any HF tool, and every spectra analyzer, can read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes seconds to import; keep `spectra --help` fast
    from transformers import LlamaConfig, LlamaForCausalLM


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


def build_model(
    name: str, vocab_size: int = 32000, seed: int = 0, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """A freshly initialised, seeded LLaMA of size `name` (float32 parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(name, vocab_size, attn_implementation))
