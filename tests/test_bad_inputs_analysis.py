"""Bad input to the analysis commands (spectrum, grad-subspace, hessian-gap), table-driven as in
tests/test_bad_inputs.py: each case exits non-zero with exactly one `error:` line naming the file or flag,
and no file that existed before the case changed (a stored series' or run's analysis store included).
Damaged stores (no meta/, a truncated chunk, NaN), mixed checkpoint series, compressed folders and
hessian-gap merges that do not fit are the issue's silent cases: each was analyzed, or answered with a raw
exception, before."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import T5_DIR, argv_with, assert_refused, make_tiny, train_steps, wiki_docs

from spectra.cli import main

pytestmark = pytest.mark.slow

VOCAB = 384  # the byte tokenizer's ids: --tokenizer bytes fits the model


def _snapshot_run(root: Path, name: str, grad_mode: str, checkpoint: bool) -> Path:
    from spectra.io.snapshots import SnapshotWriter

    run = root / name
    writer = SnapshotWriter(run / "snapshots.zarr", {"config": {"model": "tiny"}}, grad_mode=grad_mode,
                            background=False)
    model = make_tiny(vocab=VOCAB)

    def snap(step, loss):
        if step % 2 == 0:
            writer.write(model, step=step, tokens=step * 128, lr=3e-3, loss=loss)

    train_steps(model, 4, vocab=VOCAB, on_step=snap)
    writer.close()
    (run / "run_config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    if checkpoint:
        model.save_pretrained(run / "checkpoints" / "step_4")
        (run / "checkpoints" / "latest").write_text("step_4")
    return run


def _poke(array: Path, index: tuple, value: float) -> None:
    import zarr

    a = zarr.open_array(array, mode="r+")
    a[index] = value


@pytest.fixture(scope="module")
def w(tmp_path_factory, shared_data) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad-analysis")
    docs = wiki_docs(root / "docs.jsonl", 30)
    wiki_docs(root / "docs2.jsonl", 31)
    run = _snapshot_run(root, "run", "full", checkpoint=True)
    _snapshot_run(root, "nograd", "none", checkpoint=False)
    q = "params/0.q"
    for name in ("nometa", "badchunk", "nanweight", "nangrad"):
        shutil.copytree(run, root / name)
    shutil.rmtree(root / "nometa" / "snapshots.zarr" / "meta")
    chunk = root / "badchunk" / "snapshots.zarr" / q / "weight" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a truncated chunk: Zstd cannot decode it
    _poke(root / "nanweight" / "snapshots.zarr" / q / "weight", (1, 3, 5), float("nan"))
    _poke(root / "nangrad" / "snapshots.zarr" / "params/1.up" / "grad", (0, 2, 2), float("nan"))
    ckpt = run / "checkpoints" / "step_4"
    comp = root / "comp-step7"  # stands in for a `spectra compress` folder: its rank map marks it
    shutil.copytree(ckpt, comp)
    (comp / "spectra_rank_map.json").write_text(json.dumps({"method": "welore", "components": []}))
    trunc = root / "trunc"
    shutil.copytree(ckpt, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    series = root / "series"  # two good members analyzed into series/analysis.zarr, then a wrong-shape one
    for step in (1, 2):
        train_steps(make_tiny(vocab=VOCAB, seed=step), 1, vocab=VOCAB).save_pretrained(series / f"step_{step}")
    assert main(["spectrum", str(series / "step_1"), str(series / "step_2"), "--device", "cpu"]) == 0
    assert (series / "analysis.zarr").is_dir()
    shutil.copytree(series / "step_2", series / "step_3")
    sd = load_file(series / "step_3" / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 32)  # the config says 64 x 64
    save_file(sd, series / "step_3" / "model.safetensors", metadata={"format": "pt"})
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))
    gpt.save_pretrained(root / "gpt" / "step_9")
    huge = make_tiny(vocab=VOCAB)  # finite weights whose activations overflow float32: the loss is NaN
    with torch.no_grad():
        for name, prm in huge.named_parameters():
            if "mlp" in name:
                prm.mul_(1e15)
    huge.save_pretrained(root / "huge")
    (root / "emptydir").mkdir()
    (root / "cfg-topr.json").write_text(json.dumps({"top_r": 2.5}))
    (root / "cfg-steps.json").write_text(json.dumps({"steps": "abc"}))
    (root / "cfg-rank.json").write_text(json.dumps({"rank": True}))
    hg = ["hessian-gap", str(run), "--data", str(docs), "--seq-len", "16", "--batch-size", "2", "--batches", "1",
          "--k", "2", "--iterations", "8", "--block-size", "1", "--device", "cpu"]
    assert main([*hg, "--layers", "1", "--components", "v"]) == 0  # a stored partial hessian_gap to merge into
    assert (run / "analysis.zarr" / "hessian_gap").is_dir()
    return {"root": root, "run": run, "docs": docs, "series": series, "hg": hg}


def _cases(w) -> list[tuple[list[str], str]]:
    r, run, series, hg = w["root"], str(w["run"]), w["series"], w["hg"]
    part = [*hg, "--layers", "1", "--components", "down"]  # merges into the stored group

    with_ = argv_with

    return [
        # spectrum: damaged stores
        (["spectrum", str(r / "nometa"), "--device", "cpu"], "meta is missing"),
        (["spectrum", str(r / "badchunk"), "--device", "cpu"], "params/0.q/weight/c/1/0/0"),
        (["spectrum", str(r / "nanweight"), "--device", "cpu"], "non-finite weights in layer 0 q at step 4"),
        (["spectrum", str(r / "trunc"), "--device", "cpu"], "trunc/model.safetensors"),
        # spectrum: inputs that are not one model at one step
        # (a stand-in compressed folder whose rank map does not fit its weights: refused by the resolver)
        (["spectrum", str(r / "comp-step7"), "--device", "cpu"], "comp-step7/spectra_rank_map.json"),
        (["spectrum", str(series / "step_1"), str(r / "comp-step7"), "--device", "cpu"], "spectra_rank_map.json"),
        (["spectrum", str(series / "step*"), "--device", "cpu"], "q_proj.weight has shape (64, 32) but the config"),
        (["spectrum", str(series / "step_1"), str(r / "gpt" / "step_9"), "--device", "cpu"], "is a GPT2LMHeadModel"),
        (["spectrum", str(series / "step_1"), str(series / "step_1")], "share a step"),
        (["spectrum", str(series / "step_1"), str(series / "step_2"), "--steps", "5"], "--steps gives 1"),
        (["spectrum", run + "/snapshots.zarr", str(series / "step_1")], "a series is checkpoint folders"),
        (["spectrum", str(r / "nothing*")], "nothing*"),
        (["spectrum", str(w["docs"])], "is a file"),
        (["spectrum", str(r / "emptydir")], "no model checkpoint"),
        # spectrum: options
        (["spectrum", run, "--steps", "-1"], "--steps"),
        (["spectrum", run, "--steps", "a,b"], "--steps"),
        (["spectrum", run, "--steps", "3"], "step(s) [3] not in"),
        (["spectrum", run, "--top-r", "abc"], "--top-r"),
        (["spectrum", run, "--config", str(r / "cfg-topr.json")], "--top-r"),
        (["spectrum", run, "--config", str(r / "cfg-steps.json")], "--steps"),
        (["spectrum", run, "--device", "tpu"], "tpu"),
        # grad-subspace
        (["grad-subspace", str(r / "nometa")], "meta is missing"),
        (["grad-subspace", str(r / "badchunk"), "--device", "cpu"], "params/0.q/weight/c/1/0/0"),
        (["grad-subspace", str(r / "nangrad"), "--device", "cpu"], "params/1.up/grad holds NaN"),
        (["grad-subspace", str(r / "nograd"), "--device", "cpu"], "holds no gradients"),
        (["grad-subspace", run, "--rank", "65"], "exceeds min(out, in) = 64"),
        (["grad-subspace", run, "--rank", "abc"], "--rank"),
        (["grad-subspace", run, "--config", str(r / "cfg-rank.json")], "--rank"),
        (["grad-subspace", str(series / "step_1")], "has no snapshots.zarr"),
        (["grad-subspace", run + "/checkpoints/step_4"], "is a checkpoint, not a run"),
        (["grad-subspace", str(series / "step_1"), "--side", "middle"], "--side"),
        # hessian-gap: options checked before the model loads
        (with_(hg, "--iterations", "3"), "--iterations"),
        (with_(hg, "--density-hvps", "99"), "--density-hvps"),
        (with_(hg, "--tol", "0"), "--tol"),
        (with_(hg, "--gap-frac", "1.5"), "--gap-frac"),
        (with_(hg, "--block-size", "-1"), "--block-size"),
        (with_(hg, "--layers", "a"), "--layers"),
        (with_(hg, "--seq-len", "5000"), "--seq-len"),
        # hessian-gap: a partial run must fit the stored group it merges into (refused before any compute)
        (with_(part, "--k", "3"), "k 2 and this run has 3 (--k)"),
        (with_(part, "--seq-len", "8"), "(--seq-len)"),
        (with_(part, "--batches", "2"), "(--batches)"),
        (with_(part, "--data", str(r / "docs2.jsonl")), "(--data)"),
        # hessian-gap: inputs
        (["hessian-gap", str(r / "nograd" / "snapshots.zarr"), "--data", str(w["docs"])], "no model checkpoint"),
        (with_(hg, "--data", str(r / "nope.jsonl")), "nope.jsonl"),
        (with_(hg, "--batches", "400", "--batch-size", "100"), "windows"),
        (with_(hg, "--tokenizer", str(T5_DIR)), "tokenizer"),
        (with_(hg, "--out", str(w["docs"])), "docs.jsonl"),
        (["hessian-gap", str(r / "huge"), "--data", str(w["docs"]), "--tokenizer", "bytes", "--seq-len", "16",
          "--batches", "1", "--batch-size", "2", "--layers", "1", "--components", "v", "--k", "2", "--device", "cpu"],
         "huge: the loss on this token batch is nan"),
        (["hessian-gap", str(r / "gpt" / "step_9"), "--data", str(w["docs"]), "--tokenizer", "bytes",
          "--seq-len", "16", "--components", "q", "--device", "cpu"], "fused"),
    ]


N_CASES = 49


def test_table_size(w):
    assert len(_cases(w)) == N_CASES, f"the table has {len(_cases(w))} cases: set N_CASES to that"


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_analysis_input_is_one_error_line_and_touches_nothing(w, i, capsys):
    argv, fragment = _cases(w)[i]
    line = assert_refused(argv, w["root"], capsys, fragment)
    assert "np.int64" not in line and "np.float64" not in line, line



def test_merge_refusal_comes_before_any_compute(w, monkeypatch, capsys):
    """Another k than the stored group's is refused before the model is even loaded."""
    import spectra.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the merge was checked")

    monkeypatch.setattr(loading, "load_causal_lm", boom)
    assert main([*w["hg"], "--layers", "1", "--components", "down", "--k", "3"]) == 2
    assert "this run has 3 (--k)" in capsys.readouterr().err


def test_hessian_gap_offline_without_data_is_one_fast_line(w):
    """HF_HUB_OFFLINE and no --data: one line saying to pass --data, without hub retries (a fresh process, as
    the hub libraries read the variable when imported)."""
    import os
    import subprocess
    import sys

    out = w["root"] / "offline.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "spectra.cli", "hessian-gap", str(w["run"]), "--seq-len", "16",
                           "--batch-size", "2", "--batches", "1", "--k", "2", "--iterations", "8", "--device", "cpu",
                           "--out", str(out)], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "--data" in lines[-1], proc.stderr[-2000:]
    assert sum(ln.startswith("error") for ln in lines) == 1 and not any("Retry" in ln for ln in lines), lines
    assert time.perf_counter() - t < 60 and not out.exists()


def test_a_failed_eigensolver_is_one_line_not_linalgerror():
    from spectra.analysis.density import quadrature
    from spectra.errors import SpectraError

    with pytest.raises(SpectraError, match="NaN or Inf"):
        quadrature(np.full((3, 3), np.nan), 1)
