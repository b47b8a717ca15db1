"""No file spectra loads can run code: a crafted pickle put in place of each one is never executed.

Each case swaps one file of a real tiny run (checkpoint, trainer state, tokenizer, snapshot and
analysis stores, eval cache, rank maps, compressed folders) for a pickle whose unpickling would
create a marker file, runs the command that reads it, and checks that the marker never appears and
that the command either fails with one error line or (for a cache) rebuilds and succeeds.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from conftest import wiki_docs

from spectra.cli import main

pytestmark = pytest.mark.slow


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("pickle")
    docs = root / "docs.jsonl"
    wiki_docs(docs, 60)
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "3",
            "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3", "--snapshot-grad", "full",
            "--runs-dir", str(root), "--run-id", "run"]
    assert main(argv) == 0
    run = root / "run"
    assert main(["spectrum", str(run)]) == 0
    assert main(["compress", "--ckpt", str(run), "--err", "0.5", "--out", str(root / "comp")]) == 0
    cache = root / "cache"
    ev = ["eval", "--model", str(run), "--data", str(docs), "--tokenizer", "bytes", "--seq-len", "32",
          "--tokens", "256", "--cache-dir", str(cache), "--out", str(root / "eval.jsonl")]
    assert main(ev) == 0
    return {"root": root, "docs": docs, "argv": argv, "run": run, "ev": ev, "cache": cache}


def _cases(w):
    run, ckpt = w["run"], w["run"] / "checkpoints" / "step_3"
    comp = w["root"] / "comp"
    resume = [*w["argv"], "--resume"]
    chunk = next(p for p in (run / "snapshots.zarr" / "params" / "0.q" / "weight" / "c").rglob("*") if p.is_file())
    spectrum_chunk = next(p for p in (run / "analysis.zarr" / "spectrum").rglob("c/*") if p.is_file())
    return [  # (file replaced by the pickle, argv that loads it, may the command succeed?)
        (ckpt / "trainer_state.safetensors", resume, False),
        (ckpt / "trainer_state.json", resume, False),
        (ckpt / "model.safetensors", resume, False),
        (ckpt / "model.safetensors", ["eval", *w["ev"][1:]], False),
        (ckpt / "model.safetensors", ["ranks", "--ckpt", str(ckpt), "--err", "0.3", "--out",
                                      str(w["root"] / "r.json")], False),
        (ckpt / "pytorch_model.bin", ["eval", *w["ev"][1:]], False),
        (ckpt / "tokenizer_config.json", [a for a in w["ev"] if a not in ("--tokenizer", "bytes")], False),
        (ckpt / "config.json", ["spectrum", str(ckpt), "--out", str(w["root"] / "s.zarr")], False),
        (chunk, ["spectrum", str(run), "--out", str(w["root"] / "s2.zarr")], False),
        (spectrum_chunk, ["report", str(run), "--out", str(w["root"] / "rep.html")], True),
        (comp / "spectra_rank_map.json", ["eval", "--model", str(comp), *w["ev"][3:]], False),
        (comp / "model.safetensors", ["eval", "--model", str(comp), *w["ev"][3:]], False),
        (w["root"] / "map.json", ["compress", "--ckpt", str(ckpt), "--rank-map", str(w["root"] / "map.json"),
                                  "--out", str(w["root"] / "c2")], False),
        (next(w["cache"].glob("windows-*")), w["ev"], True),  # a damaged cache entry is rebuilt, never trusted
    ]


@pytest.mark.parametrize("case", range(14))
def test_a_crafted_pickle_is_never_executed(world, case, tmp_path, capsys):
    target, argv, may_succeed = _cases(world)[case]
    saved = tmp_path / "saved"
    if target.exists():
        shutil.copy2(target, saved)
    if target.name == "pytorch_model.bin":  # the loader falls back to it only without safetensors
        shutil.move(target.with_name("model.safetensors"), tmp_path / "st")
    if target.name == "trainer_state.json":
        target.with_name("trainer_state.pt").write_bytes(pickle.dumps(_Boom(tmp_path / "marker-pt")))
    marker = tmp_path / "marker"
    target.write_bytes(pickle.dumps(_Boom(marker)))
    try:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert not marker.exists() and not (tmp_path / "marker-pt").exists(), f"pickle executed via {target}"
        if not (may_succeed and code == 0):  # progress lines may precede it; the error is one line
            errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
            assert code != 0 and len(errors) == 1 and "Traceback" not in err, (target.name, code, err)
    finally:
        if saved.exists():
            shutil.copy2(saved, target)
        else:
            target.unlink(missing_ok=True)
        if (tmp_path / "st").exists():
            shutil.move(tmp_path / "st", target.with_name("model.safetensors"))
            target.unlink(missing_ok=True)
        target.with_name("trainer_state.pt").unlink(missing_ok=True) if target.name == "trainer_state.json" else None
