"""Bad input, table-driven, across every command: each case exits non-zero with exactly one `error:` line
(no traceback wall, no silently wrong result), and no file that existed before the case changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import T5_DIR, argv_with, assert_refused, wiki_docs

from spectra.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def w(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("bad")
    docs = root / "docs.jsonl"
    wiki_docs(docs, 60)
    (root / "empty.jsonl").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x80" * 10)
    (root / "bad.json").write_text("{not json")
    (root / "cfg-unknown.json").write_text(json.dumps({"stepz": 3}))
    pre = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
           "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "3",
           "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3", "--snapshot-grad", "full",
           "--runs-dir", str(root)]
    assert main([*pre, "--run-id", "run"]) == 0
    run = root / "run"
    assert main(["compress", "--ckpt", str(run), "--err", "0.5", "--out", str(root / "comp")]) == 0
    assert main(["ranks", "--ckpt", str(run), "--err", "0.5", "--out", str(root / "map.json")]) == 0
    m = json.loads((root / "map.json").read_text())
    m["components"][0]["rank"] = 100  # more than the 32x32 matrix has
    (root / "map-rank100.json").write_text(json.dumps(m))
    nan = root / "nan-ckpt"  # a copy of the checkpoint with one NaN weight
    shutil.copytree(run / "checkpoints" / "step_3", nan)
    from safetensors.torch import load_file, save_file

    sd = load_file(nan / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    return {"root": root, "docs": str(docs), "pre": pre, "run": str(run), "ckpt": str(run / "checkpoints" / "step_3"),
            "comp": str(root / "comp")}


def _cases(w) -> list[tuple[list[str], str]]:
    """(argv, a piece of the one error line)."""
    r, run, ckpt, comp, docs, pre = w["root"], w["run"], w["ckpt"], w["comp"], w["docs"], w["pre"]
    new = [*pre, "--run-id", "new"]

    def with_(*kv):
        return argv_with(new, *kv)

    ev = ["eval", "--model", run, "--data", docs, "--seq-len", "32", "--tokens", "256", "--cache-dir", str(r / "cache")]
    hg = ["hessian-gap", "--ckpt", run, "--data", docs, "--seq-len", "32", "--batch-size", "2", "--batches", "1",
          "--k", "2", "--iterations", "4", "--device", "cpu"]
    sw = ["sweep", run, "--calib-data", docs, "--eval-data", f"docs={docs}", "--methods", "welore,loss",
          "--errs", "0.5", "--err-by", "rank", "--seq-len", "32", "--eval-tokens", "256", "--calib-seqs", "4",
          "--calib-seq-len", "32", "--device", "cpu"]

    def sweep(*kv):  # the valid sweep above with options replaced (value None: the option left out)
        out = list(sw)
        for k, v in zip(kv[::2], kv[1::2]):
            if k in out:
                i = out.index(k)
                out[i:i + 2] = [] if v is None else [k, v]
            else:
                out += [k, v]
        return out

    ft = ["finetune", "--model", comp, "--data", docs, "--tokenizer", "bytes", "--steps", "2", "--batch-size", "2",
          "--micro-batch", "2", "--seq-len", "32", "--eval-tokens", "256", "--device", "cpu"]
    return [
        # pretrain
        (with_("--batch-size", "0"), "--batch-size"),
        (with_("--micro-batch", "0"), "--micro-batch"),
        (with_("--seq-len", "0"), "--seq-len"),
        (with_("--seq-len", "5000"), "--seq-len"),
        (with_("--steps", "0"), "--steps"),
        (with_("--lr", "0"), "--lr"),
        (with_("--lr", "-1"), "--lr"),
        (with_("--lr", "nan"), "--lr"),
        (with_("--val-fraction", "1.5"), "--val-fraction"),
        (with_("--val-fraction", "0"), "--val-fraction"),
        (with_("--sketch-rank", "0"), "--sketch-rank"),
        (with_("--snapshot-grad", "most"), "--snapshot-grad"),
        (with_("--model", "huge"), "--model"),
        (with_("--run-id", "../escape"), "--run-id"),
        (with_("--run-id", str(r / "abs")), "--run-id"),
        (with_("--run-id", ".hidden"), "--run-id"),
        (with_("--data", str(r / "nope.jsonl")), "matches no files"),
        (with_("--data", str(r / "empty.jsonl")), "docs"),
        (with_("--batch-size", "3"), "multiple"),
        (with_("--snapshot-steps", "a,b"), "--snapshot-steps"),
        (with_("--snapshot-steps", "0,99"), "--snapshot-steps"),
        (with_("--betas", "0.9"), "--betas"),
        (with_("--warmup", "-1"), "--warmup"),
        (with_("--eval-every", "-1"), "--eval-every"),
        (with_("--keep-checkpoints", "-1"), "--keep-checkpoints"),
        (with_("--tokenizer", str(r / "no-tokenizer")), "tokenizer"),
        (with_("--config", str(r / "missing.yaml")), "--config"),
        (with_("--config", str(r / "bad.json")), "--config"),
        (with_("--config", str(r / "cfg-unknown.json")), "stepz"),
        ([*pre, "--run-id", "run"], "--resume"),  # an existing run needs --resume
        ([*pre, "--run-id", "run", "--resume", "--lr", "0.5"], "lr"),  # changes the trajectory
        ([*pre, "--run-id", "run", "--resume", "--seed", "7"], "seed"),
        ([*pre, "--run-id", "run", "--resume", "--overwrite"], "exclude"),
        ([*pre, "--resume"], "--run-id"),
        # spectrum
        (["spectrum", str(r / "nope")], "nope"),
        (["spectrum", run, "--top-r", "0"], "--top-r"),
        (["spectrum", run, "--steps", "999"], "999"),
        (["spectrum", run, "--device", "cuda"], "cuda"),
        (["spectrum", run, "--out", str(Path(run) / "metrics.jsonl")], "metrics.jsonl"),
        (["spectrum", run, "--out", ckpt], "analysis store"),
        # grad-subspace
        (["grad-subspace", run, "--rank", "0"], "--rank"),
        (["grad-subspace", run, "--side", "up"], "--side"),
        (["grad-subspace", str(r / "nope")], "nope"),
        (["grad-subspace", ckpt], "snapshots"),
        # hessian-gap
        ([*hg, "--k", "0"], "k"),
        ([*hg, "--iterations", "0"], "--iterations"),
        ([*hg, "--batches", "0"], "--batches"),
        ([*hg, "--batch-size", "0"], "--batch-size"),
        ([*hg, "--seq-len", "5000"], "--seq-len"),
        ([*hg, "--layers", "99"], "99"),
        ([*hg, "--components", "zz"], "zz"),
        ([*hg, "--tokenizer", str(T5_DIR)], "tokenizer"),
        (["hessian-gap", "--ckpt", str(r / "nope")], "nope"),
        # ranks
        (["ranks", "--ckpt", run, "--err", "1.5"], "--err"),
        (["ranks", "--ckpt", run, "--err", "-0.1"], "--err"),
        (["ranks", "--ckpt", run, "--method", "magic"], "magic"),
        (["ranks", "--ckpt", run, "--err-by", "bits"], "bits"),
        (["ranks", "--ckpt", run, "--lrc-rule", "never"], "never"),
        (["ranks", "--ckpt", str(r / "nope")], "nope"),
        (["ranks", "--ckpt", run, "--out", str(Path(run) / "metrics.jsonl")], "rank map"),
        # compress
        (["compress", "--ckpt", run, "--out", str(r / "c1"), "--rank-map", str(r / "nope.json")], "nope.json"),
        (["compress", "--ckpt", run, "--out", str(r / "c2"), "--rank-map", str(r / "bad.json")], "bad.json"),
        (["compress", "--ckpt", run, "--out", str(r / "c3"), "--rank-map", str(r / "map-rank100.json")], "100"),
        (["compress", "--ckpt", run, "--out", ckpt], "--out"),
        (["compress", "--ckpt", run, "--out", comp], "not empty"),
        (["compress", "--ckpt", run, "--out", str(r / "c4"), "--dtype", "int3"], "int3"),
        (["compress", "--ckpt", run, "--out", str(r / "c5"), "--err", "2"], "--err"),
        (["compress", "--ckpt", ckpt, "--out", str(r / "c6"), "--merge"], "not a compressed model"),
        # eval
        ([*ev, "--seq-len", "0"], "--seq-len"),
        ([*ev, "--tokens", "0"], "--tokens"),
        ([*ev, "--batch-size", "0"], "--batch-size"),
        ([*ev, "--seq-len", "5000"], "5000"),
        ([*ev, "--tokenizer", str(T5_DIR)], "tokenizer"),
        ([*ev, "--out", str(Path(run) / "metrics.jsonl")], "metrics.jsonl"),
        ([*ev, "--data", str(r / "nope.txt")], "nope.txt"),
        (["eval", "--model", str(r / "nope"), "--data", docs], "nope"),
        # finetune
        ([*ft, "--method", "magic"], "magic"),
        ([*ft, "--steps", "0"], "--steps"),
        ([*ft, "--lr", "-1"], "--lr"),
        ([*ft, "--galore-rank", "0"], "--galore-rank"),
        ([*ft, "--lora-rank", "0"], "--lora-rank"),
        ([*ft, "--batch-size", "0"], "--batch-size"),
        ([*ft, "--seq-len", "5000"], "5000"),
        ([*ft, "--out", run], "--out"),
        # sweep
        (sweep("--errs", "1.5"), "--errs"),
        (sweep("--errs", "0,0.5"), "--errs"),
        (sweep("--errs", ""), "--errs is empty"),
        (sweep("--errs", "a,b"), "--errs"),
        (sweep("--methods", "welore,magic"), "magic"),
        (sweep("--methods", ","), "--methods is empty"),
        (sweep("--variants", "fuzzy"), "fuzzy"),
        (sweep("--err-by", "bits"), "bits"),
        (sweep("--calib-data", None), "--calib-data"),  # loss (and whitened) need calibration text
        (sweep("--calib-data", None, "--methods", "welore", "--variants", "plain", "--recover-steps", "2"),
         "--calib-data"),
        (sweep("--calib-data", str(r / "nope.jsonl")), "--calib-data"),
        (sweep("--eval-data", "docs"), "NAME=FILES"),
        (sweep("--eval-data", f"x={r / 'nope.txt'}"), "--eval-data"),
        (sweep("--eval-tokens", "8"), "--eval-tokens"),
        (sweep("--seq-len", "5000", "--eval-tokens", "8192"), "positions"),
        (sweep("--calib-seqs", "0"), "--calib-seqs"),
        (sweep("--damping", "-1"), "--damping"),
        (sweep("--loss-weight", "magic"), "--loss-weight"),
        (sweep("--recover-steps", "-1"), "--recover-steps"),
        (sweep("--recover-lr", "0", "--recover-steps", "2"), "--recover-lr"),
        (sweep("--recover-steps", "500", "--recover-batch-size", "64"), "--recover-steps"),  # more than the text
        (sweep("--tokenizer", str(T5_DIR)), "tokenizer"),
        (["sweep", str(r / "nope"), "--calib-data", docs], "nope"),
        (["sweep", str(r), "--calib-data", docs], "no model checkpoint"),  # a folder, but not a model
        (["sweep", comp, "--calib-data", docs], "already compressed"),
        (sweep("--analysis", str(Path(run) / "metrics.jsonl")), "metrics.jsonl"),  # exists, not an analysis store
        (sweep("--analysis", ckpt), "analysis store"),
        (sweep("--config", str(r / "cfg-unknown.json")), "stepz"),
        # claims
        (["claims", str(r / "nope")], "nope"),
        (["claims", run, "--n-boot", "5"], "--n-boot"),
        (["claims", run, "--rank-map", str(r / "bad.json")], "bad.json"),
        # report
        (["report", str(r / "nope")], "nope"),
        (["report", run, "--out", str(Path(run) / "metrics.jsonl")], "metrics.jsonl"),
        # pipeline
        (["pipeline", "--preset", "gigantic"], "gigantic"),
        (["pipeline", "--preset", "quickstart", "--run-id", "../x"], "--run-id"),
        (["pipeline", "--preset", "quickstart", "--steps", "0"], "--steps"),  # 0 was silently the preset's steps
        # NaN weights are refused by every loader, naming the tensor
        (["spectrum", str(r / "nan-ckpt"), "--out", str(r / "nan.zarr")], "layer 0 up"),
        (["ranks", "--ckpt", str(r / "nan-ckpt"), "--out", str(r / "nan.json")], "layer 0 up"),
        (["eval", "--model", str(r / "nan-ckpt"), "--data", docs, "--seq-len", "32", "--tokens", "256"], "up_proj"),
        # the CLI itself
        (["no-such-command"], "no-such-command"),
        (["eval", "--no-such-option"], "no-such-option"),
    ]


# the table is built from a fixture, so its length is not known at collection time: keep this in step
N_CASES = 125


def test_table_has_every_command(w):
    from spectra.cli import COMMANDS

    cases = _cases(w)
    assert len(cases) == N_CASES, f"the table has {len(cases)} cases: set N_CASES to that"
    named = {argv[0] for argv, _ in cases}
    assert {name for name, *_ in COMMANDS} <= named


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(w, i, capsys):
    argv, fragment = _cases(w)[i]
    assert_refused(argv, w["root"], capsys, fragment)
