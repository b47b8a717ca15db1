"""Crash safety of `spectra pretrain` (issue "Crash-proof runs"): SIGKILL at every file-write event of a
tiny run and of a `--resume`, SIGTERM / Ctrl-C with a snapshot in flight, and the run lock.

The kills come from tests/faultinject.py, which wraps the file writes from the test side and forks a
real process per event; after each kill the store must open with exactly committed steps that equal
the uninterrupted run, and `--resume` must reproduce that run bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import wiki_docs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs(tmp_path_factory, shared_data) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    wiki_docs(path, 150)
    return path


def args(docs: Path, steps: int = 6) -> list[str]:
    """1 layer, 3 snapshots (sketched gradients), 2 checkpoints, 2 validations: every kind of write."""
    return ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", str(steps),
            "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3", "--snapshot-grad", "sketch",
            "--sketch-rank", "4"]


def injector(work: Path, *extra: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "faultinject.py"), "--work", str(work), *extra,
                           "--", *argv], cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1800)  # ~470 real processes killed and resumed: minutes on 2 cores, more on a busy box
def test_kill_at_every_write_event_of_a_run_and_of_its_resume(docs, tmp_path):
    rep = injector(tmp_path, "--workers", "2", "--resume-kill-at", "auto", argv=args(docs))
    outcomes = Counter((r["killed"], r["error"]) for r in rep["training"] + rep["resume"])
    print(f"\nfault injection: {rep['events']} training events, {rep['resume_events']} resume events, "
          f"kinds {rep['kinds']}, outcomes {dict(outcomes)}, {rep['seconds']} s")
    assert rep["events"] > 100 and rep["resume_events"] > 20  # snapshots, checkpoints, metrics, config
    assert {"replace", "write", "link"} <= set(rep["kinds"])  # (safetensors go to a temporary folder first)
    assert any(e.endswith("checkpoints/latest") for e in rep["event_log"])  # the checkpoint publish is one
    bad = [r for r in rep["training"] + rep["resume"] if r["error"]]
    assert not bad, bad[:5]
    assert len(rep["training"]) == rep["events"] and len(rep["resume"]) == rep["resume_events"]
    assert all(r["killed"] for r in rep["training"])  # every event was reached and killed at


@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_signal_with_a_snapshot_in_flight_commits_it(docs, tmp_path, sig, code):
    res = injector(tmp_path, "--signal", sig, argv=args(docs))
    assert res["code"] == code, res
    # the signal arrived while snapshot 3 was being written on the writer thread: it was finished
    assert res["steps_after_signal"] == [0, 3], res
    assert res["error"] is None, res


def test_two_pretrains_on_one_run_id(docs, tmp_path):
    import signal

    from spectra.io.snapshots import open_run

    argv = args(docs, steps=100_000) + ["--runs-dir", str(tmp_path), "--run-id", "one"]
    first = subprocess.Popen([sys.executable, "-m", "spectra.cli", *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "one" / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text().startswith("spectra pretrain")):
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "spectra.cli", *argv, "--resume"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGTERM)  # the first run was never disturbed; now stop it the polite way
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-2000:]
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "is in use by spectra pretrain (pid" in lines[0], lines
    run = tmp_path / "one"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1  # no rows from the refused run
    snaps = list(open_run(run).steps)
    assert snaps == list(range(0, 3 * len(snaps), 3)) and snaps[-1] <= steps[-1]
    history = json.loads((run / "run_config.json").read_text())["history"]
    assert [h["event"] for h in history] == ["start"]
