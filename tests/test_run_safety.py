"""A run is never lost to `--resume` (issue "No silent wrong answer, no lost run"): a copied run (its
`latest` symlink turned into a real folder), a run whose `latest` is gone, a run with only broken
checkpoints, a NaN that must never be published as `latest`, an accepted --lr change that must really
apply, and run folders that must be real folders with real names."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import wiki_docs

from spectra.cli import main

pytestmark = pytest.mark.slow


def argv(docs: Path, runs: Path, run_id: str, steps: int = 6, *extra: str) -> list[str]:
    return ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", str(steps),
            "--eval-every", "0", "--save-every", "3", "--snapshot-every", "3", "--snapshot-grad", "none",
            "--runs-dir", str(runs), "--run-id", run_id, *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot_steps(run: Path) -> list[int]:
    from spectra.io.snapshots import open_run

    return [int(s) for s in open_run(run).steps]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("safety")
    docs = wiki_docs(base / "docs.jsonl", 60)
    runs = base / "runs"
    assert main(argv(docs, runs, "orig")) == 0
    return docs, runs / "orig"


@pytest.mark.parametrize("damage", ["copytree", "latest-missing", "latest-dangling"])
def test_resume_of_a_copied_or_damaged_run_continues_it(finished, tmp_path, damage):
    docs, orig = finished
    runs = tmp_path / "runs"
    if damage == "copytree":  # what shutil.copytree / cp -L make of the symlink: a real folder
        shutil.copytree(orig, runs / "copy")
        assert (runs / "copy/checkpoints/latest").is_dir() and not (runs / "copy/checkpoints/latest").is_symlink()
    else:
        shutil.copytree(orig, runs / "copy", symlinks=True)
        latest = runs / "copy/checkpoints/latest"
        latest.unlink()
        if damage == "latest-dangling":
            latest.symlink_to("step_999")
    before = snapshot_steps(runs / "copy")
    assert before == [0, 3, 6]
    assert main(argv(docs, runs, "copy", 9, "--resume", "--allow-config-change")) == 0
    run = runs / "copy"
    assert snapshot_steps(run) == [0, 3, 6, 9]  # nothing deleted, training went on from step 6
    assert [r["step"] for r in rows(run)] == list(range(1, 10))
    assert rows(run)[:6] == rows(orig)  # the first 6 rows are the original run's, untouched
    assert [h["event"] for h in json.loads((run / "run_config.json").read_text())["history"]] == ["start", "resume"]
    latest = run / "checkpoints/latest"
    assert latest.is_symlink() and latest.resolve().name == "step_9"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_3", "step_6", "step_9"]


def test_resume_with_only_broken_checkpoints_is_refused_and_deletes_nothing(finished, tmp_path, capsys):
    docs, orig = finished
    runs = tmp_path / "runs"
    shutil.copytree(orig, runs / "copy", symlinks=True)
    for p in (runs / "copy/checkpoints").glob("step_*"):
        (p / "trainer_state.json").unlink()  # every checkpoint incomplete
    files = sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if ".lock" not in p.name)
    assert main(argv(docs, runs, "copy", 6, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume:") and "--overwrite" in err and "\n" not in err, err
    assert sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if ".lock" not in p.name) == files


def test_resume_without_checkpoints_but_with_training_past_the_first_save_is_refused(finished, tmp_path, capsys):
    docs, orig = finished
    runs = tmp_path / "runs"
    shutil.copytree(orig, runs / "copy", symlinks=True)
    shutil.rmtree(runs / "copy/checkpoints")  # e.g. a copy of everything but the checkpoints
    assert main(argv(docs, runs, "copy", 6, "--resume")) == 2
    err = capsys.readouterr().err
    assert "holds training up to step 6" in err and "nothing was deleted" in err
    assert snapshot_steps(runs / "copy") == [0, 3, 6]


def test_a_non_finite_checkpoint_is_never_published(tmp_path):
    import torch

    from pretrain.checkpoint import save_checkpoint
    from pretrain.configs import build_model
    from spectra.errors import SpectraError

    model = build_model("micro", vocab_size=384, seed=0)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model, {"step": 1}, keep=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[383, 0] = float("nan")  # a row the data may never reach
    with pytest.raises(SpectraError, match=r"embed_tokens.weight holds NaN/Inf.*last finite checkpoint: .*step_1"):
        save_checkpoint(run, 2, model, {"step": 2}, keep=0)
    assert not (run / "checkpoints/step_2").exists()
    assert (run / "checkpoints/latest").resolve().name == "step_1"


def test_an_accepted_lr_change_on_resume_is_the_lr_used(finished, tmp_path):
    from pretrain.configs import PretrainConfig
    from pretrain.loop import lr_lambda

    docs, orig = finished
    runs = tmp_path / "runs"
    shutil.copytree(orig, runs / "copy", symlinks=True)
    shutil.rmtree(runs / "copy/checkpoints/step_6")
    (runs / "copy/checkpoints/latest").unlink()
    (runs / "copy/checkpoints/latest").symlink_to("step_3")
    assert main(argv(docs, runs, "copy", 6, "--resume", "--allow-config-change", "--lr", "0.05")) == 0
    lam = lr_lambda(PretrainConfig(steps=6, warmup=1))
    got = {r["step"]: r["lr"] for r in rows(runs / "copy")}
    for step in (4, 5, 6):  # the lr logged for a step is the one its update used
        assert math.isclose(got[step], 0.05 * lam(step - 1), rel_tol=1e-6), (step, got[step])
    history = json.loads((runs / "copy/run_config.json").read_text())["history"]
    assert history[-1]["changed"]["lr"][1] == 0.05


def test_run_folders_must_be_real_and_named(finished, tmp_path, capsys):
    docs, orig = finished
    runs = tmp_path / "runs"
    runs.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (runs / "linked").symlink_to(elsewhere)
    assert main(argv(docs, runs, "linked")) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    assert main(argv(docs, runs, "")) == 2
    assert "--run-id ''" in capsys.readouterr().err


def test_resume_without_tokenizer_uses_the_runs_own(finished, tmp_path):
    """--tokenizer is the shared option (default: the run's on --resume, else t5-base): a resume that does not
    name it continues with the tokenizer the run trained with (bytes here), not t5-base."""
    docs, orig = finished
    runs = tmp_path / "runs"
    shutil.copytree(orig, runs / "copy", symlinks=True)
    args = argv(docs, runs, "copy", 6, "--resume")
    at = args.index("--tokenizer")
    del args[at:at + 2]
    assert main(args) == 0  # a change of tokenizer would be refused without --allow-config-change
    saved = json.loads((runs / "copy/run_config.json").read_text())
    assert saved["tokenizer"] == "bytes" and [h["event"] for h in saved["history"]] == ["start", "resume"]


def test_resume_of_a_run_killed_while_creating_its_store_starts_over(finished, tmp_path):
    """A kill between the store's folder and its first zarr.json leaves only a temporary file: that is no
    snapshot, so --resume restarts the run (it used to refuse, reading the store as "training up to step inf")."""
    docs, _ = finished
    run = tmp_path / "runs" / "new"
    (run / "snapshots.zarr").mkdir(parents=True)
    (run / "snapshots.zarr" / ".zarr.json.1.2.tmp").write_text("{")
    (run / "run_config.json").write_text("{}")
    assert main(argv(docs, tmp_path / "runs", "new", 3, "--resume")) == 0
    assert snapshot_steps(run) == [0, 3] and [r["step"] for r in rows(run)] == [1, 2, 3]
