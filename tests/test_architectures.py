"""Real models in, real models out: every supported architecture, built tiny and random from its
transformers config class, goes through spectrum -> ranks -> compress -> reload (with and without
trust_remote_code) -> generate -> peft LoRA, each step checked against an independent computation.

Independent references: each fused projection is split here the way the model's own forward code
splits it (views of the fused weight per head), not through the registry's row ranges, and the row
ranges are also checked by symmetries of the forward pass (q·c with k/c, v·c with o's input/c, and
up·c with down's input/c where the activation is ReLU or gated leave the output unchanged).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

from spectra.cli import main
from spectra.components import COMPONENTS, is_conv1d, parts
from spectra.errors import SpectraError
from spectra.models import load_model

V = 96  # vocab
X = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
ERR = 0.6


def _ref_qkv_rows(W, kind, cfg):
    """(q, k, v) of a fused (out, in) weight, split as the model's forward splits its output."""
    d = cfg.hidden_size
    if kind == "phi3":
        hd = d // cfg.num_attention_heads
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        return W[:q], W[q:q + kv], W[q + kv:]
    if kind == "gpt2":
        return W.split(d, 0)
    if kind == "neox":  # per head [q | k | v]: qkv.view(..., heads, 3 * head_size).chunk(3, -1)
        h = cfg.num_attention_heads
        w = W.view(h, 3, d // h, -1)
        return tuple(w[:, j].reshape(-1, W.shape[1]) for j in range(3))
    if kind == "falcon":  # new_decoder_architecture: view(..., kv, heads/kv + 2, head_dim)
        h, kv = cfg.num_attention_heads, cfg.num_kv_heads
        w = W.view(kv, h // kv + 2, d // h, -1)
        return (w[:, :-2].reshape(-1, W.shape[1]), w[:, -2].reshape(-1, W.shape[1]), w[:, -1].reshape(-1, W.shape[1]))
    raise AssertionError(kind)


# name: (config, model class, fused kind | None, LoRA targets by original name, relu/gated MLP)
D = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)
LL = dict(D, intermediate_size=64, num_key_value_heads=2)
ARCHS = {
    "llama": (lambda: T.LlamaConfig(**LL), T.LlamaForCausalLM, None, ["q_proj", "v_proj"], True),
    "mistral": (lambda: T.MistralConfig(**LL), T.MistralForCausalLM, None, ["q_proj"], True),
    "qwen2": (lambda: T.Qwen2Config(**LL), T.Qwen2ForCausalLM, None, ["q_proj"], True),
    "gemma": (lambda: T.GemmaConfig(**LL, head_dim=8), T.GemmaForCausalLM, None, ["q_proj"], True),
    "gemma2": (lambda: T.Gemma2Config(**LL, head_dim=8), T.Gemma2ForCausalLM, None, ["o_proj"], True),
    "phi3": (lambda: T.Phi3Config(**LL, pad_token_id=0), T.Phi3ForCausalLM, "phi3", ["qkv_proj", "gate_up_proj"], True),
    "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, activation_function="relu"),
             T.GPT2LMHeadModel, "gpt2", ["c_attn"], True),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**D, intermediate_size=64, hidden_act="relu"), T.GPTNeoXForCausalLM, "neox",
                 ["query_key_value"], True),
    "opt": (lambda: T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=V,
                                word_embed_proj_dim=32, max_position_embeddings=64), T.OPTForCausalLM, None, ["q_proj"], True),
    "falcon": (lambda: T.FalconConfig(**D, new_decoder_architecture=True, num_kv_heads=2, activation="relu"),
               T.FalconForCausalLM, "falcon", ["query_key_value"], True),
    "bert": (lambda: T.BertConfig(**D, intermediate_size=64, hidden_act="relu", initializer_range=0.2), T.BertForMaskedLM, None, ["query"], True),
    "roberta": (lambda: T.RobertaConfig(**D, intermediate_size=64, hidden_act="relu", pad_token_id=1, initializer_range=0.2),
                T.RobertaForMaskedLM, None, ["value"], True),
    "distilbert": (lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V,
                                              activation="relu", initializer_range=0.2), T.DistilBertForMaskedLM, None, ["q_lin"], True),
}
ENCODERS = {"bert", "roberta", "distilbert"}


def build(name: str):
    make_cfg, cls, *_ = ARCHS[name]
    torch.manual_seed(0)
    return cls(make_cfg()).eval()


def out(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def reference_components(model, kind) -> dict[tuple[int, str], torch.Tensor]:
    """Every component's (out, in) weight, found by module type and split like the forward does."""
    refs = {}
    for p, mod in parts(model):
        W = mod.weight.detach()
        W = W.t() if is_conv1d(mod) else W
        if p.fused and p.component in ("q", "k", "v"):
            refs[(p.layer, p.component)] = _ref_qkv_rows(W, kind, model.config)["qkv".index(p.component)]
        elif p.fused:  # Phi-3 gate_up: gate, up = chunk(2)
            refs[(p.layer, p.component)] = W.chunk(2, 0)[("gate", "up").index(p.component)]
        else:
            refs[(p.layer, p.component)] = W
    return refs


def _scale(model, comp: str, c: float, *, rows: bool = True) -> None:
    """Multiply component `comp`'s rows and bias by c in every layer (rows=False: its whole
    weight, i.e. every input column, bias untouched)."""
    with torch.no_grad():
        for p, mod in parts(model):
            if p.component != comp:
                continue
            if not rows:
                mod.weight.mul_(c)
                continue
            idx = torch.tensor([i for a, b in p.rows for i in range(a, b)]) if p.fused else slice(None)
            if is_conv1d(mod):
                mod.weight[:, idx] *= c
            else:
                mod.weight[idx] *= c
            if getattr(mod, "bias", None) is not None:
                mod.bias[idx] *= c


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_registry_rows_match_the_forward_pass(name):
    """q·2 with k/2, v·2 with o/2 (o's input side) and up·2 with down/2 leave the output unchanged:
    only true when each part's rows are exactly that part (a stray row breaks the symmetry)."""
    model = build(name)
    base = out(model)
    assert {p.component for p, _ in parts(model)} <= set(COMPONENTS)
    for first, second, second_rows in (("q", "k", True), ("v", "o", False), ("up", "down", False)):
        m = build(name)
        _scale(m, first, 2.0)
        _scale(m, second, 0.5, rows=second_rows)
        got = out(m)
        assert torch.allclose(got, base, atol=2e-5), (first, second, float((got - base).abs().max()))
    broken = build(name)
    _scale(broken, "q", 30.0)  # without k/30 the attention pattern changes: the check can fail
    assert (out(broken) - base).abs().max() > 1e-3
