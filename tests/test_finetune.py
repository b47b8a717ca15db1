"""`spectra finetune`: every method lowers loss and updates exactly the parameters it should."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import C4_SAMPLE, T5_DIR, make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs; not a module-level set_num_threads

TRAIN = C4_SAMPLE.parent / "olmo_c4-sample.02.jsonl.gz"
VAL = C4_SAMPLE.parent / "olmo_c4-sample.01.jsonl.gz"
PRETRAIN = C4_SAMPLE.parent / "olmo_c4-sample.03.jsonl.gz"
LRC = ("q", "k", "gate", "up")  # compressed at 1/4 rank; v, o, down stay dense (N-LRCs)
TEST_LR = {"welore": 3e-3, "lora": 1e-2, "galore": 3e-3, "full": 3e-3}


def compress(model, components=LRC, frac=0.25):
    """WeLore-COMP through `spectra.compress` with a hand-made rank map: `components` become
    rank-(frac * full) `LowRankLinear`s (LRCs), the rest stay dense at full rank (N-LRCs)."""
    from spectra.compression.lowrank import compress as compress_model
    from spectra.models.parts import iter_components

    entries = []
    for layer, comp, _, mod in iter_components(model):
        full = min(mod.weight.shape)
        lrc = comp in components
        entries.append({"layer": layer, "component": comp, "shape": list(mod.weight.shape), "full_rank": full,
                        "rank": int(frac * full) if lrc else full, "lrc": lrc})
    rank_map = {"method": "uniform", "target_err": 0.3, "achieved_err": None, "k": None, "err_by": "rank",
                "components": entries}
    return compress_model(model, rank_map, progress=False), rank_map


VOCAB = 256  # T5 ids folded mod 256: real text statistics at a 125x smaller (faster) lm_head


def folded(docs_path, tokenizer, seq_len=64, batch=8):
    from spectra.data import PackedStream, load_local_docs

    return [
        x % VOCAB
        for x in PackedStream(load_local_docs(str(docs_path)), tokenizer, seq_len, seed=0, loop=False).batches(batch)
    ]


@pytest.fixture(scope="module")
def pretrained(tokenizer):
    """Tiny LLaMA briefly trained on (folded) C4 text, then compressed at q, k, gate, up."""
    model = make_tiny(vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = folded(PRETRAIN, tokenizer)
    for step in range(30):
        x = batches[step % len(batches)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return compress(model)[0]


@pytest.fixture(scope="module")
def data(tokenizer):
    from spectra.data import text_windows

    return folded(TRAIN, tokenizer, batch=4), text_windows(str(VAL), tokenizer, 64, 2048, cache_dir=None) % VOCAB


def run_method(pretrained, data, method, steps=20, **kw):
    from spectra.lm.finetune import finetune
    from spectra.lm.recipe import FinetuneConfig

    cfg = FinetuneConfig(
        method=method,
        steps=steps,
        lr=TEST_LR[method],
        batch_size=4,
        micro_batch=2,
        warmup=2,
        galore_rank=2,
        lora_rank=4,
        **kw,
    )
    model = copy.deepcopy(pretrained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter([b for x in data[0] for b in x.split(2)] * 2)
    model, metrics = finetune(model, batches, cfg, torch.device("cpu"), val=data[1])
    return model, before, metrics


def changed(model, before) -> set[str]:
    """State-dict keys whose tensors differ from `before` (peft prefixes stripped)."""
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def lrc_keys(model) -> set[str]:
    from spectra.compression.lowrank import LowRankLinear

    return {f"{n}.{f}.weight" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in "AB"}


def assert_learned(metrics):
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert len(losses) == 20 and [s for s, _ in metrics["loss_curve"]] == list(range(1, 21))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert metrics["eval_ppl"] < metrics["eval_ppl_before"]
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0


def test_welore_trains_only_lrc_factors(pretrained, data):
    model, before, m = run_method(pretrained, data, "welore")
    assert_learned(m)
    lrc = lrc_keys(pretrained)
    assert len(lrc) == 2 * 2 * len(LRC)
    assert changed(model, before) == lrc  # N-LRCs, embeddings, norms, lm_head bit-identical
    # hand count: r (in + out) per factored matrix, r = 16 for the 64x64 q/k, 16 for 176x64 gate/up
    assert m["trainable_params"] == 2 * (2 * 16 * (64 + 64) + 2 * 16 * (64 + 176))
    assert m["total_params"] == sum(p.numel() for p in pretrained.parameters())


def test_lora_leaves_base_weights_unchanged(pretrained, data):
    model, before, m = run_method(pretrained, data, "lora")
    assert_learned(m)
    assert changed(model, before) == set()
    adapters = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    # adapters on every decoder linear leaf: dense v, o, down + A and B of the 4 LRCs, x 2 layers
    assert len(adapters) == 2 * (3 + 2 * 4) and all(v.abs().sum() > 0 for v in adapters.values())
    leaves = [(64, 16), (16, 64)] * 2 + [(64, 64)] * 2 + [(64, 16), (16, 176)] * 2 + [(176, 64)]
    assert m["trainable_params"] == 2 * sum(4 * (i + o) for i, o in leaves)
    assert m["total_params"] == sum(p.numel() for p in pretrained.parameters()) + m["trainable_params"]


def test_galore_updates_decoder_linears_in_rank_r_subspace(pretrained, data):
    from spectra.lm.finetune import decoder_linears

    model, before, m = run_method(pretrained, data, "galore")
    assert_learned(m)
    assert changed(model, before) == set(before)  # everything trains (non-matrix params with plain Adam)
    assert m["trainable_params"] == m["total_params"] == sum(p.numel() for p in pretrained.parameters())
    # projector fixed for 20 < 200 steps: each matrix moved only inside its rank-2 gradient subspace
    for name, lin in decoder_linears(model).items():
        s = torch.linalg.svdvals((lin.weight - before[f"{name}.weight"]).double())
        assert s[2] < 1e-4 * s[0], name
    s = torch.linalg.svdvals((model.lm_head.weight - before["lm_head.weight"]).double())
    assert s[2] > 1e-2 * s[0]  # lm_head is not projected


def test_full_updates_every_parameter(pretrained, data):
    model, before, m = run_method(pretrained, data, "full")
    assert_learned(m)
    assert changed(model, before) == set(before)
    assert m["trainable_params"] == m["total_params"] == sum(p.numel() for p in pretrained.parameters())


def test_welore_refuses_dense_model():
    from spectra.errors import SpectraError
    from spectra.lm.finetune import prepare
    from spectra.lm.recipe import FinetuneConfig

    with pytest.raises(SpectraError, match="not a compressed model.*spectra compress"):
        prepare(make_tiny(), FinetuneConfig(method="welore"), torch.device("cpu"))


def test_schedule_warmup_then_cosine_to_tenth():
    from spectra.schedule import warmup_cosine as lr_lambda

    f = lr_lambda(warmup=4, steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tokenizer):
    """runs/xyz with a dense tiny checkpoint over the T5 vocab and its compressed copy."""
    from pretrain.configs import vocab_for
    from spectra.models.compressed import save_compressed

    run = tmp_path_factory.mktemp("proj") / "runs" / "xyz"
    make_tiny(vocab=vocab_for(len(tokenizer))).save_pretrained(run / "checkpoints" / "step_3")
    (run / "checkpoints" / "latest").write_text("step_3")
    save_compressed(*compress(make_tiny(vocab=vocab_for(len(tokenizer)))), run / "compressed" / "uniform-err30")
    return run


def test_cli_welore_writes_metrics_json_and_model(t5_run, tmp_path, capsys):
    from spectra.cli import main
    from spectra.compression.lowrank import LowRankLinear
    from spectra.data import load_tokenizer, text_windows
    from spectra.lm.evaluate import perplexity
    from spectra.models.loading import load_causal_lm

    model = t5_run / "compressed" / "uniform-err30"
    args = [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(TRAIN),
        "--val-data",
        str(VAL),
        "--tokenizer",
        str(T5_DIR),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--seq-len",
        "32",
        "--warmup",
        "1",
        "--eval-tokens",
        "512",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path),
        "--save",
    ]
    assert main(args) == 0
    out = t5_run / "finetune" / "welore-err30"  # err from the model's rank map
    metrics = json.loads((out / "metrics.json").read_text())
    assert {
        "method",
        "err",
        "steps",
        "trainable_params",
        "total_params",
        "peak_memory_bytes",
        "tokens_per_s",
        "loss_curve",
        "eval_ppl",
    } <= set(metrics)
    assert (metrics["method"], metrics["err"], metrics["steps"]) == ("welore", 0.3, 3)
    assert [s for s, _ in metrics["loss_curve"]] == [1, 2, 3] and metrics["tokens"] == 3 * 4 * 32
    assert metrics["trainable_params"] == 2 * (2 * 16 * (64 + 64) + 2 * 16 * (64 + 176))
    assert metrics["peak_memory_bytes"] > 0 and metrics["eval_tokens"] == 16 * 31
    assert f"-> {out / 'metrics.json'}" in capsys.readouterr().out
    # the saved model is still compressed and evaluates to the reported perplexity
    saved = load_causal_lm(out / "model")
    assert sum(isinstance(m, LowRankLinear) for m in saved.modules()) == 2 * len(LRC)
    windows = text_windows(str(VAL), load_tokenizer(str(T5_DIR)), 32, 512, cache_dir=tmp_path)
    assert perplexity(saved, windows, 2)[1] == pytest.approx(metrics["eval_ppl"], rel=1e-5)


def test_cli_lora_on_dense_checkpoint_saves_merged_model(t5_run, tmp_path):
    from spectra.cli import main
    from spectra.models.loading import load_causal_lm

    out = tmp_path / "lora"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(t5_run),
                "--method",
                "lora",
                "--data",
                str(TRAIN),
                "--val-data",
                str(VAL),
                "--tokenizer",
                str(T5_DIR),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--micro-batch",
                "2",
                "--seq-len",
                "16",
                "--warmup",
                "1",
                "--eval-tokens",
                "64",
                "--device",
                "cpu",
                "--cache-dir",
                str(tmp_path),
                "--out",
                str(out),
                "--save",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["err"]) == ("lora", 0.0)
    assert metrics["trainable_params"] == 2 * 8 * (4 * (64 + 64) + 2 * (64 + 176) + (176 + 64))
    merged = load_causal_lm(out / "model")  # plain HF folder again: adapters merged, no peft keys
    assert not any("lora" in k for k in merged.state_dict())


def test_cli_bad_inputs_exit_2_one_line(t5_run, tmp_path, capsys):
    from spectra.cli import main

    common = ["--data", str(TRAIN), "--tokenizer", str(T5_DIR), "--steps", "1", "--device", "cpu"]
    for args, msg in [
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(t5_run), "--method", "welore"], "not a compressed model"),
        (["--model", str(t5_run), "--method", "dora"], "--method"),
        (["--model", str(t5_run), "--batch-size", "3", "--micro-batch", "2"], "multiple of --micro-batch"),
    ]:
        assert main(["finetune", *args, *common]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and len(err.splitlines()) == 1, err


@pytest.mark.gpu
def test_gpu_bf16_autocast_welore_uses_less_memory_than_full(pretrained, data):
    from spectra.lm.finetune import finetune
    from spectra.lm.recipe import FinetuneConfig

    peaks = {}
    for method in ("welore", "full"):
        cfg = FinetuneConfig(method=method, steps=3, lr=3e-3, batch_size=4, micro_batch=4, warmup=1)
        model, m = finetune(copy.deepcopy(pretrained), iter(data[0]), cfg, torch.device("cuda"), val=data[1])
        assert m["peak_memory_kind"] == "cuda_max_allocated" and m["eval_ppl"] < m["eval_ppl_before"]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 masters under autocast
        peaks[method] = m["peak_memory_bytes"]
    assert peaks["welore"] < peaks["full"]


@pytest.mark.parametrize("method", ["welore", "full"])
def test_frozen_n_lrcs_keep_no_grads_state_or_weight_grad_activations(pretrained, data, method):
    """WeLore-PEFT materializes nothing for the frozen N-LRCs: no .grad, no optimizer state, and
    autograd does not save their inputs (needed only for their weight gradients). `full` is the
    control: there the same input of down_proj is saved."""
    from spectra.lm.finetune import prepare
    from spectra.lm.loss import causal_lm_loss
    from spectra.lm.recipe import FinetuneConfig

    model, opt = prepare(copy.deepcopy(pretrained), FinetuneConfig(method=method), torch.device("cpu"))
    assert opt.defaults["fused"]  # the same fused AdamW for both (a per-tensor loop would flatter welore)
    downs = [layer.mlp.down_proj for layer in model.model.layers]  # N-LRCs (dense, frozen under welore)
    inputs, saved = [], set()
    hooks = [d.register_forward_hook(lambda _m, args, _o: inputs.append(args[0])) for d in downs]
    first = model.model.layers[0].self_attn.q_proj  # an LRC in the lowest layer
    below = []
    hooks.append(first.register_forward_hook(lambda _m, args, _o: below.append(args[0])))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(t.data_ptr()) or t, lambda t: t):
        loss = causal_lm_loss(model, data[0][0][:2])
    for h in hooks:
        h.remove()
    loss.backward()
    opt.step()
    assert len(inputs) == len(downs) and len(below) == 1
    # under welore nothing below the lowest LRC trains (frozen embedding and norm): no gradient
    # flows into the embedding output, so autograd's backward ends at layer 0's factor weights
    assert below[0].requires_grad == (method == "full")
    assert (model.lm_head.weight.grad is None) == (method == "welore")  # lm_loss skips the frozen head's grad
    kept = [x.data_ptr() in saved for x in inputs]
    state = {id(p) for p in opt.state}
    if method == "welore":
        assert not any(kept)
        assert all(d.weight.grad is None and id(d.weight) not in state for d in downs)
        assert state == {id(p) for p in model.parameters() if p.requires_grad}  # LRC factors only
    else:
        assert all(kept) and all(d.weight.grad is not None and id(d.weight) in state for d in downs)


def _welore_curve(pretrained, batches, steps=5, **kw):
    from spectra.lm.finetune import finetune
    from spectra.lm.recipe import FinetuneConfig

    cfg = FinetuneConfig(method="welore", steps=steps, lr=3e-3, batch_size=4, micro_batch=2, warmup=2, **kw)
    model, m = finetune(copy.deepcopy(pretrained), iter(batches), cfg, torch.device("cpu"))
    return model, [loss for _, loss in m["loss_curve"]], m


def test_welore_curve_equals_the_plain_unfused_loop(pretrained, data):
    """The harness (fused AdamW, chunked loss, one sync per step) trains exactly as the textbook
    loop did before it: HF's labels= loss, per-tensor AdamW, LRC factors only, same schedule/clip."""
    from spectra.lm.finetune import lrc_modules
    from spectra.schedule import warmup_cosine

    batches = [b for x in data[0] for b in x.split(2)][:10]
    model, curve, m = _welore_curve(pretrained, batches)
    assert m["tokens_per_cpu_s"] > 0
    ref_model = copy.deepcopy(pretrained).requires_grad_(False)
    params = [p for lr in lrc_modules(ref_model) for p in (lr.A.weight, lr.B.weight)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0, eps=1e-8, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 5, 0.1))
    ref, it = [], iter(batches)
    for _ in range(5):
        total = 0.0
        for x in (next(it), next(it)):
            loss = ref_model(input_ids=x, labels=x).loss / 2
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref.append(total)
    assert curve == pytest.approx(ref, abs=1e-6)
    assert not torch.equal(lrc_modules(model)[0].A.weight, lrc_modules(pretrained)[0].A.weight)  # it did train
    for a, b in zip(lrc_modules(model), lrc_modules(ref_model)):
        torch.testing.assert_close(a.A.weight, b.A.weight, rtol=0, atol=1e-5)  # <1% of one lr=3e-3 step
        torch.testing.assert_close(a.B.weight, b.B.weight, rtol=0, atol=1e-5)  # <1% of one lr=3e-3 step


def test_cpu_bf16_autocast_tracks_fp32_with_fp32_masters(pretrained, data):
    batches = [b for x in data[0] for b in x.split(2)][:6]
    _, fp32, _ = _welore_curve(pretrained, batches, steps=3)
    model, bf16, _ = _welore_curve(pretrained, batches, steps=3, dtype="bf16")
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert 0 < max(diffs) < 2e-2  # bf16 matmuls really ran, and stayed within bf16's rounding of fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
