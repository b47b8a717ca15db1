"""`spectra pretrain --strategy fsdp` (FSDP2) on CPU with gloo: 2 sharded processes against 1 unsharded process
on the same global batches, the DDP path on the same ranks, sharded (DCP) checkpoints, the save_pretrained copy
and its converter, memory per rank, and a SIGKILL + --resume on the sharded path.

The 1-process reference is the plain (DDP, world 1) loop fed the two ranks' micro-batches in turn (rank 0's,
then rank 1's, each step): its accumulated gradient g0/2 + g1/2 is the 2-rank mean (g0 + g1)/2 bit for bit
(halving is exact), so the losses agree to float64 rounding and the weights until the gradient clipping's
norm, summed over shards in another order, moves them by an ulp (measured: <= 1e-8 absolute after 4 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import wiki_docs

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.slow  # torchrun subprocesses (~20 s each on 2 busy cores)
WEIGHT_ATOL = 1e-6  # after 4 AdamW steps at lr 1e-3 (weights ~0.07): 1e-8 measured, 100x margin
TIMING = ("tokens_per_s", "elapsed_s")


def argv(docs: Path, runs: Path, run_id: str, *extra: str) -> list[str]:
    return ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "4", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "4",
            "--eval-every", "2", "--save-every", "2", "--keep-checkpoints", "0", "--snapshot-every", "2",
            "--snapshot-grad", "full", "--no-cpu-bf16", "--device", "cpu", "--runs-dir", str(runs),
            "--run-id", run_id, *extra]


def torchrun(args: list[str], script: list[str] | None = None) -> subprocess.CompletedProcess:
    target = script or ["-m", "spectra.cli"]
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *target, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


class _Interleaved:
    """The 2-rank data in one stream: each step's micro-batches are rank 0's, then rank 1's."""

    def __init__(self, streams):
        self.streams = streams

    @property
    def state(self):
        return self.streams[0].state

    def batches(self, batch_size: int):
        its = [s.batches(batch_size) for s in self.streams]
        while True:
            for it in its:
                yield next(it)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    """{name: run folder}: fsdp (2 ranks), ddp (2 ranks), one (1 process, the 2 ranks' batches in turn)."""
    import pretrain.loop as loop
    from spectra.cli import main

    base = tmp_path_factory.mktemp("fsdp")
    docs = wiki_docs(base / "docs.jsonl", 150)
    runs = base / "runs"
    out = {"docs": docs, "runs": runs}
    for name, extra in (("fsdp", ["--strategy", "fsdp"]), ("ddp", [])):
        proc = torchrun(argv(docs, runs, name, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = runs / name
    original = loop._data

    def two_ranks_in_turn(cfg, tok, rank, world):
        assert world == 1
        parts = [original(cfg, tok, r, 2) for r in range(2)]
        return _Interleaved([p[0] for p in parts]), parts[0][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_data", two_ranks_in_turn)
        assert main(argv(docs, runs, "one")) == 0
    out["one"] = runs / "one"
    return out


def test_two_sharded_ranks_match_one_process_and_ddp(runs):
    from safetensors.torch import load_file

    from spectra.io.snapshots import open_run

    fs, one, ddp = rows(runs["fsdp"]), rows(runs["one"]), rows(runs["ddp"])
    assert [r["step"] for r in fs] == [1, 2, 3, 4] and fs[-1]["tokens"] == 4 * 4 * 32 == one[-1]["tokens"]
    for a, b in zip(fs, one):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert ("val_loss" in a) == ("val_loss" in b) and abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-5
    assert [r["loss"] for r in fs] == [r["loss"] for r in ddp]  # the same ranks' arithmetic: equal bit for bit
    assert [r.get("val_loss") for r in fs] == [r.get("val_loss") for r in ddp]
    sf, s1 = open_run(runs["fsdp"]), open_run(runs["one"])
    assert list(sf.steps) == list(s1.steps) == [0, 2, 4] and sf.keys() == s1.keys() and len(sf.keys()) == 7
    worst = 0.0
    for layer, comp in sf.keys():
        a, b = sf.param(layer, comp).load(), s1.param(layer, comp).load()
        assert a["weight"].dtype == np.float32 and a["grad"].shape == b["grad"].shape
        # before any update the store is the unsharded run's bit for bit: init, gathering and gradient mean
        assert np.array_equal(a["weight"].values[0], b["weight"].values[0]), (layer, comp)
        assert np.array_equal(a["grad"].values[0], b["grad"].values[0]), (layer, comp)
        for v in ("weight", "grad"):
            worst = max(worst, float(np.abs(a[v].values - b[v].values).max()))
    print(f"\nfsdp 2 ranks vs 1 process: max |snapshot difference| {worst:.2e}")
    assert worst < WEIGHT_ATOL
    for step in (2, 4):  # the published save_pretrained copy of the sharded checkpoint
        a = load_file(runs["fsdp"] / "checkpoints" / f"step_{step}" / "model.safetensors")
        b = load_file(runs["one"] / "checkpoints" / f"step_{step}" / "model.safetensors")
        assert sorted(a) == sorted(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHT_ATOL
        snap = sf.weight(0, "q").sel(step=step).values  # snapshot s == checkpoint s, bit for bit, as on DDP
        assert np.array_equal(snap, a["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_sharded_checkpoint_holds_the_optimizer_and_converts_to_the_same_weights(runs, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    import spectra
    from pretrain.checkpoint import load_trainer_state
    from spectra.errors import SpectraError
    from spectra.io.runs import latest_checkpoint

    ckpt = latest_checkpoint(runs["fsdp"])
    assert ckpt.name == "step_4" and sorted(p.name for p in (ckpt / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    state = load_trainer_state(ckpt)
    assert state["strategy"] == "fsdp" and state["world"] == 2 and state["step"] == 4 and "optimizer" not in state
    out = spectra.dcp_to_pretrained(ckpt, tmp_path / "hf")
    a, b = load_file(out / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SpectraError, match="exists"):
        spectra.dcp_to_pretrained(ckpt, out)
    with pytest.raises(SpectraError, match="no torch.distributed.checkpoint"):
        spectra.dcp_to_pretrained(tmp_path, tmp_path / "x")
    # the AdamW moments in dcp/ are the unsharded run's (to the clipping ulp)
    one = load_trainer_state(latest_checkpoint(runs["one"]))["optimizer"]["state"]
    name = "model.layers.0.self_attn.q_proj.weight"
    meta = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata()
    key = f"optimizer.state.{name}.exp_avg"
    assert key in meta.state_dict_metadata
    sd = {key: torch.empty(meta.state_dict_metadata[key].size)}
    dcp.load(sd, checkpoint_id=ckpt / "dcp")
    from pretrain.configs import build_model

    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    order = [n for n, _ in build_model("micro", vocab).named_parameters()]  # the DDP state's keys: param order
    ref = one[order.index(name)]["exp_avg"]
    assert sd[key].shape == ref.shape and float((sd[key] - ref).abs().max()) < 1e-7


def test_sharded_ranks_hold_a_fraction_of_the_parameters(runs):
    from pretrain.configs import build_model

    mem = json.loads((runs["fsdp"] / "memory.json").read_text())
    vocab = json.loads((runs["fsdp"] / "checkpoints" / "step_4" / "config.json").read_text())["vocab_size"]
    full = sum(p.numel() * 4 for p in build_model("micro", vocab).parameters())
    print("\nper rank: " + "; ".join(f"params {r['param_bytes']} B, AdamW {r['optimizer_bytes']} B, peak RSS "
                                      f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" for r in mem["ranks"])
          + f" (unsharded model: {full} B)")
    assert mem["world"] == 2 and len(mem["ranks"]) == 2
    assert sum(r["param_bytes"] for r in mem["ranks"]) >= full  # every parameter is held by some rank
    for r in mem["ranks"]:  # each rank holds about half (dim-0 shards, padded to equal size)
        assert r["param_bytes"] <= 0.55 * full and r["optimizer_bytes"] <= 2 * 0.55 * full


def test_kill_and_resume_on_the_sharded_path(runs, tmp_path):
    """SIGKILL rank 0 (tests/faultinject.py's hooks, in the torchrun worker) before step 3's metrics row, after
    the sharded checkpoint of step 2 was published; --resume continues bit for bit like the uninterrupted run."""
    from safetensors.torch import load_file

    from spectra.io.snapshots import open_run

    args = argv(runs["docs"], tmp_path, "fsdp", "--strategy", "fsdp")
    killed = torchrun(_without_runs_dir(args),
                      ["tests/faultinject.py", "--work", str(tmp_path / "fi"), "--in-process", "--kill-on",
                       "metrics.jsonl", "--nth", "3", "--runs-dir", str(tmp_path), "--"])
    assert killed.returncode != 0
    run = tmp_path / "fsdp"
    assert [r["step"] for r in rows(run)] == [1, 2] and (run / "checkpoints" / "latest").resolve().name == "step_2"
    assert list(open_run(run).steps) == [0, 2]
    resumed = torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(run) == rows(runs["fsdp"])
    a, b = open_run(run), open_run(runs["fsdp"])
    assert list(a.steps) == [0, 2, 4]
    for layer, comp in a.keys():
        assert a.param(layer, comp).load().drop_attrs().equals(b.param(layer, comp).load().drop_attrs())
    wa = load_file(run / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(runs["fsdp"] / "checkpoints" / "step_4" / "model.safetensors")
    assert all(bool((wa[k] == wb[k]).all()) for k in wb)


def _without_runs_dir(args: list[str]) -> list[str]:
    i = args.index("--runs-dir")
    return args[:i] + args[i + 2:]


def test_a_checkpoint_resumes_only_with_its_strategy(runs, tmp_path, capsys):
    import shutil

    import torch.distributed as dist

    from spectra.cli import main

    shutil.copytree(runs["one"], tmp_path / "one", symlinks=True)
    code = main([*argv(runs["docs"], tmp_path, "one", "--strategy", "fsdp"), "--resume"])
    err = capsys.readouterr().err
    assert code != 0 and "written by --strategy ddp; resume with that strategy" in err, err[-2000:]
    assert not dist.is_initialized()  # the one-process FSDP2 group went with the refused run


@pytest.mark.timeout(900)
def test_kill_at_every_publish_event_of_a_one_rank_sharded_run(runs, tmp_path):
    """tests/faultinject.py's sweep on the FSDP2 path (one process: its fork server runs no torchrun): SIGKILL
    before each checkpoint publish (rename, `latest`) and each snapshot commit, then --resume reproduces the
    uninterrupted run bit for bit. (All 311 events' metrics/config/memory kinds plus a resume sweep: 27 trials,
    all exact, ~5 min on 2 busy cores; run `faultinject.py --only ... --resume-kill-at auto` for it.)"""
    argv_ = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(runs["docs"]), "--seq-len", "32",
             "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "6",
             "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3", "--snapshot-grad", "sketch",
             "--sketch-rank", "4", "--strategy", "fsdp"]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "faultinject.py"), "--work", str(tmp_path),
                           "--workers", "2", "--only", "checkpoints,snapshots.zarr/zarr.json", "--", *argv_],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    kinds = [rep["event_log"][r["event"]] for r in rep["training"]]
    print(f"\nfsdp fault injection: {len(kinds)} of {rep['events']} events, {rep['seconds']} s")
    assert sum(k.endswith("checkpoints/latest") for k in kinds) == 2 and sum("step_" in k for k in kinds) == 2
    assert sum(k.endswith("snapshots.zarr/zarr.json") for k in kinds) >= 3
    assert all(r["killed"] for r in rep["training"]), rep["training"]
    bad = [r for r in rep["training"] if r["error"]]
    assert not bad, bad
