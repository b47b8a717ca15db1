"""WeLore-COMP: factorization, compress -> save -> load identity, merge, full-rank round trip, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_error_line
from safetensors import safe_open
from torch import nn

from spectra.cli import main
from spectra.compression.allocation import build_rank_map
from spectra.compression.lowrank import compress, factorize, merge, truncate_
from spectra.compression.ranks import model_spectra
from spectra.errors import SpectraError
from spectra.models.compressed import load_compressed, save_compressed
from spectra.models.loading import load_causal_lm
from spectra.models.modeling_spectra import LowRankLinear
from spectra.models.parts import iter_components

X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.fixture()
def dense(tiny_ckpt):
    return load_causal_lm(tiny_ckpt, attn_implementation="eager")


def full_rank_map(model) -> dict:
    rm = build_rank_map(model_spectra(model), "welore", 0.0)
    for e in rm["components"]:
        assert e["rank"] == e["full_rank"]
        e["lrc"] = True  # force factors at full rank
    return rm


# --------------------------------------------------------------------------- one matrix
def test_factorize_splits_sqrt_sigma_and_truncates_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(48, 20, bias=True)
    U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    lr = factorize(lin, 7)
    assert (lr.A.weight.shape, lr.B.weight.shape) == ((7, 48), (20, 7))
    # √σ on both sides: A Aᵀ = Bᵀ B = diag(σ_1..σ_7)
    torch.testing.assert_close(lr.A.weight @ lr.A.weight.T, torch.diag(S[:7]), atol=1e-5, rtol=0)
    torch.testing.assert_close(lr.B.weight.T @ lr.B.weight, torch.diag(S[:7]), atol=1e-5, rtol=0)
    # Eckart–Young: ‖W − BA‖_F² = Σ_{i>7} σ_i²
    resid = (lin.weight - lr.weight).norm() ** 2
    assert resid.item() == pytest.approx((S[7:] ** 2).sum().item(), rel=1e-4)
    assert torch.equal(lr.B.bias, lin.bias)
    x = torch.randn(3, 48)
    torch.testing.assert_close(lr(x), x @ lr.weight.T + lin.bias)
    dense = nn.Linear(48, 20, bias=False)
    dense.weight.data.copy_(lin.weight.data)
    truncate_(dense, 7)
    torch.testing.assert_close(dense.weight.detach(), lr.weight.detach(), atol=1e-5, rtol=0)  # B·A: read-only product
    assert torch.linalg.matrix_rank(dense.weight).item() == 7


# --------------------------------------------------------------------------- whole model
def test_full_rank_compress_reproduces_logits(dense):
    ref = logits(dense)
    compress(dense, full_rank_map(dense), progress=False)
    assert all(isinstance(m, LowRankLinear) for *_, m in iter_components(dense))
    torch.testing.assert_close(logits(dense), ref, atol=1e-5, rtol=0)


def test_compress_save_load_identical_and_merge(dense, tmp_path):
    rm = build_rank_map(model_spectra(dense), "welore", 0.4)
    assert 0 < sum(e["lrc"] for e in rm["components"]) < len(rm["components"])  # both kinds present
    ref = logits(dense)
    compress(dense, rm, progress=False)
    got = logits(dense)
    assert (got - ref).abs().max() > 1e-3  # really compressed
    save_compressed(dense, rm, tmp_path / "c")
    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    lrc0 = next(e for e in rm["components"] if e["lrc"])
    name = (
        f"model.layers.{lrc0['layer']}.{'self_attn' if lrc0['component'] in 'qkvo' else 'mlp'}.{lrc0['component']}_proj"
    )
    assert {f"{name}.A.weight", f"{name}.B.weight"} <= keys and f"{name}.weight" not in keys
    loaded = load_causal_lm(tmp_path / "c", attn_implementation="eager")  # via models -> load_compressed
    assert torch.equal(logits(loaded), got)
    by_key = {(e["layer"], e["component"]): e for e in rm["components"]}
    for layer, comp, _, mod in iter_components(loaded):
        e = by_key[(layer, comp)]
        assert isinstance(mod, LowRankLinear) == e["lrc"]
        if e["lrc"]:
            assert mod.rank == e["rank"]
        else:  # dense N-LRCs hold the rank-r truncation
            assert torch.linalg.matrix_rank(mod.weight).item() == e["rank"]
    # merge: each dense weight is exactly the product B·A
    products = {n: m.B.weight @ m.A.weight for _, _, n, m in iter_components(loaded) if isinstance(m, LowRankLinear)}
    merge(loaded)
    mods = dict(loaded.named_modules())
    assert products and all(type(mods[n]) is nn.Linear and torch.equal(mods[n].weight, w) for n, w in products.items())
    torch.testing.assert_close(logits(loaded), got, atol=1e-5, rtol=0)


def test_qwen_style_bias_and_tied_embeddings(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    rm = build_rank_map(model_spectra(model), "welore", 0.5, "params")
    compress(model, rm, progress=False)
    save_compressed(model, rm, tmp_path / "q")
    loaded = load_compressed(tmp_path / "q", attn_implementation="eager")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
    assert any(isinstance(m, LowRankLinear) and m.B.bias is not None for *_, m in iter_components(loaded))


def test_rank_map_must_fit_the_model(dense):
    rm = build_rank_map(model_spectra(dense), "welore", 0.3)
    rm["components"][0]["shape"] = [32, 64]
    with pytest.raises(SpectraError, match="shape"):
        compress(dense, rm, progress=False)
    rm["components"] = rm["components"][1:]
    with pytest.raises(SpectraError, match="missing"):
        compress(dense, rm, progress=False)


# --------------------------------------------------------------------------- CLI
def test_cli_compress_ranks_merge_end_to_end(tiny_ckpt, tmp_path):
    assert (
        main(
            ["ranks", "--ckpt", str(tiny_ckpt), "--err", "0.3", "--err-by", "params", "--out", str(tmp_path / "m.json")]
        )
        == 0
    )
    assert (
        main(
            ["compress", "--ckpt", str(tiny_ckpt), "--rank-map", str(tmp_path / "m.json"), "--out", str(tmp_path / "c")]
        )
        == 0
    )
    rm = json.loads((tmp_path / "c" / "spectra_rank_map.json").read_text())
    assert rm == json.loads((tmp_path / "m.json").read_text())
    comp = load_causal_lm(tmp_path / "c", attn_implementation="eager")
    n_lrc = sum(isinstance(m, LowRankLinear) for *_, m in iter_components(comp))
    assert n_lrc == sum(e["lrc"] for e in rm["components"]) > 0
    assert main(["compress", "--ckpt", str(tmp_path / "c"), "--merge", "--out", str(tmp_path / "d")]) == 0
    assert not (tmp_path / "d" / "spectra_rank_map.json").exists()
    merged = load_causal_lm(tmp_path / "d", attn_implementation="eager")
    assert not any(isinstance(m, LowRankLinear) for *_, m in iter_components(merged))
    torch.testing.assert_close(logits(merged), logits(comp), atol=1e-5, rtol=0)
    # on-the-fly WeLore map (no --rank-map), bfloat16 output
    assert (
        main(
            ["compress", "--ckpt", str(tiny_ckpt), "--err", "0.5", "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]
        )
        == 0
    )
    rm = json.loads((tmp_path / "b" / "spectra_rank_map.json").read_text())
    assert rm["method"] == "welore" and abs(rm["achieved_err"] - 0.5) <= 0.5 / 896
    loaded = load_compressed(tmp_path / "b", dtype=None)
    want = {(c["layer"], c["component"]): (nn.Linear, LowRankLinear)[c["lrc"]] for c in rm["components"]}
    assert {(l, c): type(m) for l, c, _, m in iter_components(loaded)} == want and len(set(want.values())) == 2
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_cli_compress_bad_input_is_one_line(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        ["compress", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        [
            "compress",
            "--ckpt",
            str(tiny_ckpt),
            "--rank-map",
            str(tmp_path / "missing.json"),
            "--out",
            str(tmp_path / "o"),
        ],
        ["compress", "--ckpt", str(tiny_ckpt), "--rank-map", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")],
        ["compress", "--ckpt", str(tiny_ckpt), "--merge", "--out", str(tmp_path / "o")],  # not compressed
        ["compress", "--ckpt", str(tiny_ckpt), "--out", str(tiny_ckpt)],
        ["compress", "--ckpt", str(tiny_ckpt), "--dtype", "int8", "--out", str(tmp_path / "o")],
    ]
    assert_one_error_line(cases, capsys)


def test_tokenizer_travels_and_legacy_folders_still_load(tiny_ckpt, tmp_path):
    """compress and --merge copy the source's tokenizer; a folder compressed before folders were HF
    models (config.json of the dense architecture + rank map) still loads with spectra."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tmp_path / "dense"
    shutil.copytree(tiny_ckpt, src)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "low": 1, "rank": 2, "weights": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    assert main(["compress", "--ckpt", str(src), "--err", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert main(["compress", "--ckpt", str(tmp_path / "c"), "--merge", "--out", str(tmp_path / "d")]) == 0
    for folder in ("c", "d"):
        assert AutoTokenizer.from_pretrained(tmp_path / folder)("low rank weights")["input_ids"] == [1, 2, 3]
    comp = load_compressed(tmp_path / "c")
    # an LRC component of rank r has exactly r nonzero singular values (spectrum refuses compressed folders)
    e = next(e for e in json.loads((tmp_path / "c" / "spectra_rank_map.json").read_text())["components"] if e["lrc"])
    from spectra.models.parts import component_parts

    W = next(p.weight(m) for p, m in component_parts(comp) if (p.layer, p.component) == (e["layer"], e["component"]))
    sigma = torch.linalg.svdvals(W.detach().double()).numpy()
    assert (sigma[: e["rank"]] > 1e-3).all() and (sigma[e["rank"] : e["full_rank"]] < 1e-5).all()
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "c", legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    for k in ("auto_map", "spectra_structure", "spectra_base_model_type", "spectra_base_architecture"):
        cfg.pop(k)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "modeling_spectra.py").unlink()
    torch.testing.assert_close(logits(load_causal_lm(legacy)), logits(comp), atol=0, rtol=0)


def test_peft_all_linear_wraps_each_factor_once_and_merges(dense):
    """peft's "all-linear" on a compressed model adapts A and B of every low-rank module once each (not the
    module around them as well), and merge_and_unload folds the adapters into the factors: same outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    compress(dense, build_rank_map(model_spectra(dense), "welore", 0.5, "params"), progress=False)
    lowrank = {n for n, m in dense.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank
    pm = get_peft_model(copy.deepcopy(dense), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    wrapped = [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == len(set(wrapped)) and not set(wrapped) & lowrank
    assert {f"{n}.{f}" for n in lowrank for f in "AB"} <= set(wrapped)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        y = pm(input_ids=X).logits
        merged = pm.merge_and_unload()
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=X).logits, y, atol=1e-5, rtol=1e-4)
    assert (y - logits(dense)).abs().max() > 1e-3
