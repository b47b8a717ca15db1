"""Pretraining on the real Wikipedia shards: loss goes down, resume is exact, snapshots match checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import T5_DIR, WIKI_VAL

from spectra.cli import main

REPO = Path(__file__).resolve().parents[1]
# the small (14 MB) Wikipedia validation dump keeps dataset preparation fast; one shard is enough
DATA = str(WIKI_VAL / "wiki_00.jsonl.gz")
BASE = ["pretrain", "--model", "tiny", "--data", DATA, "--tokenizer", str(T5_DIR), "--seq-len", "64",
        "--batch-size", "8", "--micro-batch", "4", "--val-tokens", "8192", "--warmup", "2"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectra.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shared_data):
    runs = tmp_path_factory.mktemp("runs")
    args = BASE + ["--steps", "12", "--lr", "3e-3", "--eval-every", "6", "--save-every", "4", "--keep-checkpoints", "0",
                   "--snapshot-every", "4", "--snapshot-grad", "full", "--runs-dir", str(runs), "--run-id", "full"]
    assert main(args) == 0
    return runs / "full", args


def test_validation_loss_goes_down(full_run):
    run, _ = full_run
    val = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(val) == 2
    assert val[1] < val[0] - 0.05  # 12 steps of AdamW on real text already help
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["tokens"] == 12 * 8 * 64


def test_snapshots_round_trip_checkpoints_bit_exactly(full_run):
    from safetensors.torch import load_file

    from spectra.io.snapshots import open_run

    run, _ = full_run
    store = open_run(run)
    assert list(store.steps) == [0, 4, 8, 12]
    assert list(store.meta["tokens"].values) == [0, 4 * 512, 8 * 512, 12 * 512]
    assert store.attrs["config"]["model"] == "tiny" and store.attrs["versions"]["zarr"].startswith("3")
    assert len(store.keys()) == 2 * 7
    for step in (4, 8, 12):
        ckpt = load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")
        for layer, comp in store.keys():
            mod = "self_attn" if comp in "qkvo" else "mlp"
            ref = ckpt[f"model.layers.{layer}.{mod}.{comp}_proj.weight"].numpy()
            got = store.weight(layer, comp).sel(step=step).values
            assert got.dtype == np.float32 and np.array_equal(got, ref), (step, layer, comp)
    g = store.param(1, "down")["grad"].sel(step=12).values
    assert np.isfinite(g).all() and np.abs(g).sum() > 0


@pytest.mark.slow  # starts a subprocess
def test_resume_after_kill_reproduces_the_curve(full_run, tmp_path):
    run, args = full_run
    args = list(args)
    args[args.index("--run-id") + 1] = "killed"
    args[args.index("--runs-dir") + 1] = str(tmp_path)
    # a real SIGKILL, placed from the test side (tests/faultinject.py) before step 7's metrics row
    runs_at = args.index("--runs-dir")
    inject = subprocess.run([sys.executable, str(REPO / "tests" / "faultinject.py"), "--work", str(tmp_path / "fi"),
                             "--kill-on", "metrics.jsonl", "--nth", "7", "--runs-dir", args[runs_at + 1], "--",
                             *args[:runs_at], *args[runs_at + 2:]], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert json.loads(inject.stdout.strip().splitlines()[-1])["code"] == -9, inject.stderr[-2000:]
    assert [r["step"] for r in metrics(tmp_path / "killed")][-1] == 6  # steps 5, 6 logged after checkpoint 4
    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = metrics(run), metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
    from spectra.io.snapshots import open_run

    assert list(open_run(tmp_path / "killed").steps) == [0, 4, 8, 12]
    w_ref = open_run(run).weight(0, "q").sel(step=12).values
    w_got = open_run(tmp_path / "killed").weight(0, "q").sel(step=12).values
    assert np.abs(w_ref - w_got).max() < 1e-5


@pytest.mark.slow  # starts a subprocess
def test_ddp_two_cpu_processes(tmp_path, shared_data):
    torchrun = Path(sys.executable).parent / "torchrun"
    args = BASE + ["--steps", "3", "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3",
                   "--runs-dir", str(tmp_path), "--run-id", "ddp", "--device", "cpu"]
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "spectra.cli", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isfinite(rows[-1]["val_loss"])
    assert rows[-1]["tokens"] == 3 * 8 * 64  # the global batch is split, not repeated, across ranks
    from pretrain.checkpoint import load_trainer_state

    state = load_trainer_state(tmp_path / "ddp" / "checkpoints" / "step_3")
    assert state["world"] == 2 and len(state["data"]) == 2
    assert state["data"][0].index != 0 and not np.array_equal(state["data"][0].buffer, state["data"][1].buffer)
    from spectra.io.snapshots import open_run

    assert list(open_run(tmp_path / "ddp").steps) == [0, 3]


@pytest.mark.slow  # starts a subprocess
def test_offline_without_data_names_the_flag(tmp_path, shared_data):
    # HF_HUB_OFFLINE=1 is what an unreachable hub looks like, without 40 s of connection retries
    proc = run_cli(["pretrain", "--model", "tiny", "--tokenizer", str(T5_DIR), "--runs-dir", str(tmp_path)],
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "--data" in err[0], proc.stderr[-2000:]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    assert main(BASE[:3] + ["--data", str(tmp_path / "nope.jsonl"), "--runs-dir", str(tmp_path)]) == 2
    assert main(["pretrain", "--model", "huge", "--data", DATA, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "matches no files" in err[0] and "--model" in err[1] and "huge" in err[1]
