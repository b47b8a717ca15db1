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
from spectra.models.components import COMPONENTS, is_conv1d, parts
from spectra.models.loading import load_model

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
    if kind == "falcon" and cfg.multi_query and not cfg.new_decoder_architecture:  # view(..., heads + 2, hd)
        hd = d // cfg.num_attention_heads
        return W[:d], W[d:d + hd], W[d + hd:]
    if kind == "falcon" and not cfg.new_decoder_architecture:  # view(..., heads, 3, hd)
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
    "gpt2": (
        lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V, activation_function="relu"),
        T.GPT2LMHeadModel,
        "gpt2",
        ["c_attn"],
        True,
    ),
    "gpt_neox": (
        lambda: T.GPTNeoXConfig(**D, intermediate_size=64, hidden_act="relu"),
        T.GPTNeoXForCausalLM,
        "neox",
        ["query_key_value"],
        True,
    ),
    "opt": (
        lambda: T.OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=V,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        T.OPTForCausalLM,
        None,
        ["q_proj"],
        True,
    ),
    "falcon": (
        lambda: T.FalconConfig(**D, new_decoder_architecture=True, num_kv_heads=2, activation="relu"),
        T.FalconForCausalLM,
        "falcon",
        ["query_key_value"],
        True,
    ),
    "falcon_mq": (
        lambda: T.FalconConfig(**D, multi_query=True, activation="relu", bias=True),
        T.FalconForCausalLM,
        "falcon",
        ["query_key_value"],
        True,
    ),
    "falcon_mha": (
        lambda: T.FalconConfig(**D, multi_query=False, activation="relu"),
        T.FalconForCausalLM,
        "falcon",
        ["query_key_value"],
        True,
    ),
    "bert": (
        lambda: T.BertConfig(**D, intermediate_size=64, hidden_act="relu", initializer_range=0.2),
        T.BertForMaskedLM,
        None,
        ["query"],
        True,
    ),
    "roberta": (
        lambda: T.RobertaConfig(**D, intermediate_size=64, hidden_act="relu", pad_token_id=1, initializer_range=0.2),
        T.RobertaForMaskedLM,
        None,
        ["value"],
        True,
    ),
    "distilbert": (
        lambda: T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V, activation="relu", initializer_range=0.2
        ),
        T.DistilBertForMaskedLM,
        None,
        ["q_lin"],
        True,
    ),
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


def _truncated(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).float()


def _welore_ranks(refs: dict, k: float) -> dict:
    """r = #{ŝ ≥ k} with ŝ the min-max normalized singular values (WeLore §3.1), computed here."""
    out = {}
    for key, W in refs.items():
        s = torch.linalg.svdvals(W.double()).numpy()
        out[key] = int(((s - s.min()) / (s.max() - s.min()) >= k).sum())
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_analyze_rank_compress_reload_generate_peft(name, tmp_path, capsys):
    import copy

    from peft import LoraConfig, get_peft_model

    from spectra.io.analysis_store import read_analysis
    from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
    from spectra.models.parts import component_weights

    _, cls, kind, targets, _ = ARCHS[name]
    encoder = name in ENCODERS
    model = build(name)
    refs = reference_components(model, kind)
    dense, comp, merged = tmp_path / f"{name}-dense", tmp_path / f"{name}-lowrank", tmp_path / f"{name}-merged"
    model.save_pretrained(dense)

    # spectrum: σ of every component equals svdvals of the forward-split weight
    assert main(["spectrum", str(dense), "--out", str(tmp_path / "a.zarr"), "--device", "cpu"]) == 0
    ds = read_analysis(tmp_path / "a.zarr", "spectrum")
    for (layer, c), W in refs.items():
        s = ds.sigma.sel(layer=layer, component=c).isel(step=0).values
        want = torch.linalg.svdvals(W.double()).numpy()
        np.testing.assert_allclose(s[: len(want)], want, rtol=1e-4, atol=1e-6)

    # ranks: the map's ranks are WeLore's threshold ranks of the same weights
    rmap_path = tmp_path / "map.json"
    assert main(["ranks", "--ckpt", str(dense), "--err", str(ERR), "--out", str(rmap_path), "--device", "cpu"]) == 0
    rmap = json.loads(rmap_path.read_text())
    entries = {(e["layer"], e["component"]): e for e in rmap["components"]}
    assert set(entries) == set(refs)
    assert {k: e["rank"] for k, e in entries.items()} == _welore_ranks(refs, rmap["k"])
    assert all(e["shape"] == list(refs[k].shape) for k, e in entries.items())
    assert abs(rmap["achieved_err"] - ERR) < 0.05

    # compress: every LRC part is B·A = its truncated SVD; N-LRCs hold their truncation
    assert (
        main(["compress", "--ckpt", str(dense), "--out", str(comp), "--rank-map", str(rmap_path), "--device", "cpu"])
        == 0
    )
    low = load_model(comp)
    weights = component_weights(low)
    lrc = [k for k, e in entries.items() if e["lrc"]]
    assert lrc, "the test needs low-rank components"
    for key, e in entries.items():
        want = _truncated(refs[key], e["rank"]) if e["rank"] < e["full_rank"] else refs[key]
        torch.testing.assert_close(weights[key].detach(), want, atol=2e-5, rtol=1e-4)
    found = {(p.layer, p.component): m for p, m in parts(low)}
    for key in lrc:
        m = found[key]
        m = m.get_submodule(key[1]) if isinstance(m, FusedLinear) else m
        assert isinstance(m, LowRankLinear) and m.rank == entries[key]["rank"]
    if kind is not None:  # fused projections were really compressed, per part
        assert any(isinstance(m, FusedLinear) for m in low.modules())
    n_params = sum(p.numel() for p in low.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())

    # reload the Hugging Face way: same outputs with trust_remote_code, a loud error without
    auto = T.AutoModel if encoder else T.AutoModelForCausalLM
    hf = auto.from_pretrained(comp, trust_remote_code=True).eval()
    with torch.no_grad():
        if encoder:
            torch.testing.assert_close(
                hf(input_ids=X).last_hidden_state, low.base_model(input_ids=X).last_hidden_state, atol=1e-5, rtol=0
            )
            head = T.AutoModelForMaskedLM.from_pretrained(comp, trust_remote_code=True).eval()
            torch.testing.assert_close(out(head), out(low), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(out(hf), out(low), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in hf.parameters()) <= n_params
    with pytest.raises(ValueError, match="trust_remote_code"):
        auto.from_pretrained(comp)
    assert (comp / "modeling_spectra.py").is_file()
    assert json.loads((comp / "config.json").read_text())["model_type"] == "spectra_lowrank"

    if not encoder:  # generate: greedy continuation identical to spectra's loader
        prompt = X[:1, :4]
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(hf.generate(prompt, **kw), low.generate(prompt, **kw))

    # peft LoRA: "all-linear" and the factor names wrap each factor (and each dense linear) once, never the
    # low-rank module around them, and the adapters merge into the factors; a low-rank module named by its
    # original name is refused by peft (it is no linear)
    base_out = out(hf) if not encoder else hf(input_ids=X).last_hidden_state
    lowrank = {n for n, m in hf.named_modules() if type(m).__name__ in ("LowRankLinear", "FusedLinear")}
    if any(n.rsplit(".", 1)[-1] in targets for n in lowrank):
        with pytest.raises(ValueError, match="not supported"):
            get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
    for tm in (targets, ["A", "B"], "all-linear"):
        if tm is targets and any(n.rsplit(".", 1)[-1] in targets for n in lowrank):
            continue
        pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, lora_alpha=4, target_modules=tm))
        wrapped = [n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                   if hasattr(m, "lora_A") and len(m.lora_A)]
        assert wrapped and len(wrapped) == len(set(wrapped)) and not set(wrapped) & lowrank, (tm, wrapped)
        assert set(wrapped) <= linears and (tm == "all-linear" or all(any(n.endswith(t) for t in tm) for n in wrapped))
        if tm == "all-linear":  # every linear leaf of the model but the LM head, each once: A and B included
            head = {n for n, m in hf.named_modules() if m is hf.get_output_embeddings()}
            assert set(wrapped) == linears - head and {f"{n}.{f}" for n in lowrank if n not in head
                                                       for f in "AB" if f"{n}.{f}" in linears} <= set(wrapped)
        with torch.no_grad():
            y0 = pm(input_ids=X)
        y0 = y0.last_hidden_state if encoder else y0.logits
        torch.testing.assert_close(y0, base_out, atol=1e-6, rtol=0)  # LoRA B starts at zero
        y = pm(input_ids=X)
        (y.last_hidden_state if encoder else y.logits).square().mean().backward()
        grads = [(n, p.grad) for n, p in pm.named_parameters() if "lora_" in n]
        used = [g for n, g in grads if "pooler" not in n]  # BertModel's pooler is not in last_hidden_state
        assert used and all(g is not None for g in used)
        with torch.no_grad():  # a trained adapter, then merged into the (factor) linears it wraps
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
            y = pm(input_ids=X)
            y = y.last_hidden_state if encoder else y.logits
            merged_model = pm.merge_and_unload()
            y2 = merged_model(input_ids=X)
        torch.testing.assert_close(y2.last_hidden_state if encoder else y2.logits, y, atol=1e-5, rtol=1e-4)
        assert (y - base_out).abs().max() > 1e-3  # the adapters did change the output

    # --merge: a plain dense folder the original class reads without remote code
    assert main(["compress", "--ckpt", str(comp), "--out", str(merged), "--merge"]) == 0
    assert "auto_map" not in json.loads((merged / "config.json").read_text())
    torch.testing.assert_close(out(cls.from_pretrained(merged).eval()), out(low), atol=1e-5, rtol=0)


def test_unsupported_model_one_line_then_components_override(tmp_path, capsys):
    """A model the registry does not know (T5) fails with one line naming its linears and the
    override; `spectra --components ...` then ranks and compresses it."""
    from conftest import assert_one_error_line

    cfg = T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    t5 = tmp_path / "t5"
    T.T5ForConditionalGeneration(cfg).save_pretrained(t5)
    assert_one_error_line([["ranks", "--ckpt", str(t5), "--out", str(tmp_path / "m.json")]], capsys)
    main(["ranks", "--ckpt", str(t5)])
    err = capsys.readouterr().err
    assert "encoder.block.0.layer.0.SelfAttention.q" in err and "--components q=REGEX" in err
    enc = r"^encoder\.block\.(\d+)\.layer\.{}$"
    spec = ",".join(
        f"{c}={enc.format(n)}"
        for c, n in (
            ("q", r"0\.SelfAttention\.q"),
            ("k", r"0\.SelfAttention\.k"),
            ("v", r"0\.SelfAttention\.v"),
            ("o", r"0\.SelfAttention\.o"),
            ("up", r"1\.DenseReluDense\.wi"),
            ("down", r"1\.DenseReluDense\.wo"),
        )
    )
    try:
        assert (
            main(["--components", spec, "ranks", "--ckpt", str(t5), "--out", str(tmp_path / "m.json"), "--err", "0.5"])
            == 0
        )
        rmap = json.loads((tmp_path / "m.json").read_text())
        assert len(rmap["components"]) == 12 and {e["component"] for e in rmap["components"]} == set(COMPONENTS) - {
            "gate"
        }
        assert (
            main(
                [
                    "--components",
                    spec,
                    "compress",
                    "--ckpt",
                    str(t5),
                    "--out",
                    str(tmp_path / "c"),
                    "--rank-map",
                    str(tmp_path / "m.json"),
                ]
            )
            == 0
        )
        assert (tmp_path / "c" / "modeling_spectra.py").is_file()
        assert_one_error_line(
            [
                ["--components", "q=(", "ranks", "--ckpt", str(t5)],
                ["--components", "x=foo", "ranks", "--ckpt", str(t5)],
            ],
            capsys,
        )
    finally:  # the next test runs without the override
        from spectra.models.components import set_override

        set_override(None)


def test_checkpoint_series_spectrum_then_report(tmp_path, capsys):
    """Three GPT-NeoX checkpoints (Pythia-style step folders) -> one labeled spectrum store -> report."""
    series = tmp_path / "pythia"
    model = build("gpt_neox")
    qs = {}
    for i, step in enumerate((1000, 2000, 3000)):  # folder naming styles mixed on purpose
        with torch.no_grad():  # a "training" drift between checkpoints
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        name = f"step{step}" if step != 2000 else f"step_{step}"
        model.save_pretrained(series / name)
        qs[step] = reference_components(model, "neox")[(1, "q")]
    assert main(["spectrum", str(series / "step*"), "--device", "cpu"]) == 0
    from spectra.io.analysis_store import read_analysis

    ds = read_analysis(series / "analysis.zarr", "spectrum")
    assert ds.step.values.tolist() == [1000, 2000, 3000]
    for step, W in qs.items():
        want = torch.linalg.svdvals(W.double()).numpy()
        np.testing.assert_allclose(ds.sigma.sel(step=step, layer=1, component="q").values[: len(want)], want, rtol=1e-4)
    assert main(["report", str(series)]) == 0
    html = (series / "report.html").read_text()
    import re

    from reports.html import unpacked

    blob = re.search(r'id="figures-gz">([A-Za-z0-9+/=]+)</script>', html).group(1)
    assert "3000" in unpacked(blob) and len(html) > 10_000  # the figures (packed in the page) span the series
    # explicit steps, in the order given; a folder without a step in its name needs them
    assert (
        main(
            [
                "spectrum",
                str(series / "step1000"),
                str(series / "step_2000"),
                "--steps",
                "10,5",
                "--out",
                str(tmp_path / "b.zarr"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert read_analysis(tmp_path / "b.zarr", "spectrum").step.values.tolist() == [5, 10]
    import shutil

    shutil.copytree(series / "step3000", series / "final")  # a real folder: no step in its name or files
    from conftest import assert_one_error_line

    assert_one_error_line(
        [
            ["spectrum", str(series / "step1000"), str(series / "final"), "--device", "cpu"],
            ["spectrum", str(series / "step1000"), str(series / "final"), "--steps", "1"],
            ["spectrum", str(series / "nothing*")],
        ],
        capsys,
    )


def test_hub_names_resolve_through_snapshot_download(tmp_path, monkeypatch, capsys):
    """`org/name@revision` goes to huggingface_hub.snapshot_download (stubbed here: this machine is
    offline) and the revision names the step; a hub that cannot provide it is one error line."""
    import huggingface_hub

    ckpts = {}
    for step in (1000, 3000):
        m = build("gpt_neox")
        ckpts[f"step{step}"] = tmp_path / "cache" / f"snap{step}"
        m.save_pretrained(ckpts[f"step{step}"])
    calls = []

    def fake(repo, revision=None, allow_patterns=None, **_):
        calls.append((repo, revision))
        return str(ckpts[revision])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["spectrum", "EleutherAI/pythia-14m@step1000", "EleutherAI/pythia-14m@step3000", "--device", "cpu"]) == 0
    )
    assert calls == [("EleutherAI/pythia-14m", "step1000"), ("EleutherAI/pythia-14m", "step3000")]
    from spectra.io.analysis_store import read_analysis

    assert read_analysis(tmp_path / "EleutherAI/pythia-14m/analysis.zarr", "spectrum").step.values.tolist() == [
        1000,
        3000,
    ]

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    from conftest import assert_one_error_line

    assert_one_error_line([["ranks", "--ckpt", "EleutherAI/pythia-14m"]], capsys)


@pytest.mark.parametrize("name", ["phi3", "gpt2", "gpt_neox", "falcon"])
def test_fused_mixed_plans_gradients_and_merge(name):
    """Layer 0: every fused part dense and truncated (the module stays fused and dense); layer 1: q
    low-rank, k dense truncated, v untouched (a FusedLinear with mixed children). Weights equal the
    truncated SVDs of the forward-split weights, merging restores the original module type (Conv1D
    for GPT-2) with the same outputs, and Part.grad is the forward-split gradient."""
    from spectra.compression.allocation import build_rank_map
    from spectra.compression.lowrank import compress, merge
    from spectra.compression.ranks import model_spectra
    from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
    from spectra.models.parts import component_weights

    kind = ARCHS[name][2]
    model = build(name)
    model(input_ids=X).logits.square().mean().backward()
    grads = {}
    for p, mod in parts(model):
        if p.fused and p.component in "qkv":
            g = mod.weight.grad.t() if is_conv1d(mod) else mod.weight.grad
            grads[(p.layer, p.component)] = (
                p.grad(mod),
                _ref_qkv_rows(g, kind, model.config)["qkv".index(p.component)],
            )
    assert grads and all(torch.equal(a, b) for a, b in grads.values())
    model.zero_grad()

    refs = reference_components(model, kind)
    fused_mod = {p.component: p.module_name for p, _ in parts(model) if p.fused and p.layer == 0 and p.component == "q"}
    dense_type = type(model.get_submodule(fused_mod["q"]))
    rm = build_rank_map(model_spectra(model), "welore", 0.3)
    plan = {
        (0, "q"): (False, -3),
        (0, "k"): (False, -3),
        (0, "v"): (False, -3),
        (1, "q"): (True, 3),
        (1, "k"): (False, -1),
        (1, "v"): (False, 0),
    }
    for e in rm["components"]:
        lrc, r = plan.get((e["layer"], e["component"]), (e["lrc"], None))
        if r is not None:
            e.update(lrc=lrc, rank=r if lrc else e["full_rank"] + r)
    ranks = {(e["layer"], e["component"]): (e["rank"], e["full_rank"]) for e in rm["components"]}
    compress(model, rm, progress=False)
    for key, W in component_weights(model).items():
        r, full = ranks[key]
        torch.testing.assert_close(
            W.detach(), _truncated(refs[key], r) if r < full else refs[key], atol=2e-5, rtol=1e-4
        )
    assert type(model.get_submodule(fused_mod["q"])) is dense_type
    fused1 = model.get_submodule(fused_mod["q"].replace(".0.", ".1."))
    assert isinstance(fused1, FusedLinear) and isinstance(fused1.q, LowRankLinear) and fused1.q.rank == 3
    assert type(fused1.k) is torch.nn.Linear and type(fused1.v) is torch.nn.Linear
    before = out(model)
    merge(model)
    merged = model.get_submodule(fused_mod["q"].replace(".0.", ".1."))  # Conv1D again for GPT-2
    assert not isinstance(merged, FusedLinear) and is_conv1d(merged) == (dense_type.__name__ == "Conv1D")
    torch.testing.assert_close(out(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["phi3", "gpt2"])
def test_finetune_targets_leaves_of_compressed_fused_models(name):
    """spectra finetune's LoRA / WeLore-PEFT on a compressed fused model train the factors and dense
    parts (never a computed product), and the LoRA model merges back (what finetune saves)."""
    from spectra.compression.allocation import build_rank_map
    from spectra.compression.lowrank import compress
    from spectra.compression.ranks import model_spectra
    from spectra.lm.finetune import decoder_linears, prepare
    from spectra.lm.recipe import FinetuneConfig
    from spectra.models.modeling_spectra import FusedLinear

    model = build(name)
    compress(model, build_rank_map(model_spectra(model), "welore", ERR), progress=False)
    leaves = decoder_linears(model)
    assert any(".q.A" in n for n in leaves) and not any(isinstance(m, FusedLinear) for m in leaves.values())
    assert all(isinstance(getattr(m, "weight", None), torch.nn.Parameter) for m in leaves.values())
    lora, _ = prepare(model, FinetuneConfig(method="lora", lora_rank=2), torch.device("cpu"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        want = out(lora)
        torch.testing.assert_close(out(lora.merge_and_unload()), want, atol=1e-5, rtol=1e-4)
    fresh = build(name)
    compress(fresh, build_rank_map(model_spectra(fresh), "welore", ERR), progress=False)
    welore, _ = prepare(fresh, FinetuneConfig(method="welore"), torch.device("cpu"))
    trained = {n for n, p in welore.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".A.weight", ".B.weight")) for n in trained)
    assert any(".q.A." in n for n in trained)  # parts of fused projections train too


def test_unknown_model_type_with_partial_llama_names_is_refused():
    """A model type the registry does not list is read with LLaMA names only when all seven
    components are there (Qwen3-style); a Mixtral-style MoE, whose experts are not gate/up/down,
    is refused rather than analyzed by halves."""
    from spectra.errors import SpectraError

    qwen3 = T.Qwen3ForCausalLM(T.Qwen3Config(**LL, head_dim=8))
    assert len(parts(qwen3)) == 2 * 7
    moe = T.MixtralForCausalLM(T.MixtralConfig(**LL, num_local_experts=2))
    with pytest.raises(SpectraError, match="only part of its components .no gate, up, down"):
        parts(moe)
