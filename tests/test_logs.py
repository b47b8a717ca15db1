"""Logs (issues "spectra as a library" and "No silent wrong answer"): a long command whose stdout and stderr go to
files writes plain periodic lines, each at most 200 characters, with no carriage return (a non-TTY quickstart
pretrain log used to be one line of 34,799 characters), no library's own tqdm bar, and rich tables at full width.

`check_log(argv, tmp_path)` runs any `spectra` argv that way and returns its lines: add a case per long command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wiki_docs

pytestmark = pytest.mark.slow  # subprocesses
REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 200


def check_log(argv: list[str], tmp_path: Path, env: dict | None = None, every: float = 0,
              timeout: int = 600) -> tuple[list[str], list[str]]:
    """Run `spectra *argv` with stdout and stderr redirected to files (so neither is a TTY) and progress lines
    every `every` seconds; assert exit 0, no '\\r', no line over 200 characters, no cut table value. Returns
    (stdout lines, stderr lines)."""
    out_file, err_file = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {**os.environ, "SPECTRA_PROGRESS_EVERY": str(every), **(env or {})}
    env.pop("COLUMNS", None)  # what a batch job has
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        code = subprocess.run([sys.executable, "-m", "spectra.cli", *argv], cwd=REPO, stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL, env=env, timeout=timeout).returncode
    texts = [f.read_bytes().decode() for f in (out_file, err_file)]
    assert code == 0, texts[1][-3000:]
    for name, text in zip(("stdout", "stderr"), texts):
        assert "\r" not in text, (name, text[:500])
        long = [line for line in text.splitlines() if len(line) > MAX_LINE]
        assert not long, (name, len(long[0]), long[0][:300])
        assert "…" not in text, (name, [line for line in text.splitlines() if "…" in line][:3])  # a cut value
    return texts[0].splitlines(), texts[1].splitlines()


def test_pretrain_log_is_plain_periodic_lines(tmp_path, shared_data):
    docs = wiki_docs(tmp_path / "docs.jsonl", 40)
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "6",
            "--eval-every", "3", "--save-every", "3", "--snapshot-every", "3", "--runs-dir", str(tmp_path / "runs"),
            "--run-id", "log", "--device", "cpu"]
    out, err = check_log(argv, tmp_path)
    assert out == [f"run written to {tmp_path / 'runs' / 'log'}"]
    # every=0: a line at the start, one per step, one at the end; nothing else (no library's bar, no warning)
    assert len(err) == 8 and all(line.startswith("pretrain micro: ") for line in err), err
    assert err[0] == "pretrain micro: 0/6 (0%), elapsed 0:00:00"
    assert err[-1].startswith("pretrain micro: 6/6 (100%), ") and ", done, loss=" in err[-1] and "val_ppl=" in err[-1]


TABLE = """
from rich.console import Console
from rich.table import Table
from spectra.cli import _output_for_logs

t = Table("component", *[f"ERR {e / 10:.1f}" for e in range(1, 10)])
t.add_row("model.layers.11.self_attn.q_proj", *[f"{0.0123456 * e:.6f}" for e in range(1, 10)])
with _output_for_logs():
    Console().print(t)
"""


def test_a_table_in_a_log_is_full_width(tmp_path):
    """rich cuts a table to 80 columns when stdout is a file ("0.01…"); the CLI gives it its natural width."""
    out, _ = check_log(["--version"], tmp_path)  # the helper itself on a trivial command
    assert out[0].startswith("spectra ")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    text = subprocess.run([sys.executable, "-c", TABLE], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120).stdout
    row = next(line for line in text.splitlines() if "q_proj" in line)
    assert "…" not in text and "0.111110" in row and 80 < len(row) <= MAX_LINE, text
    bare = subprocess.run([sys.executable, "-c", TABLE.replace("with _output_for_logs():\n    ", "")], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120).stdout
    assert "…" in bare  # what the log got before: the check above can fail


def test_library_bars_stay_out_of_a_log(tmp_path, tiny_ckpt):
    """transformers' "Loading weights" bar (and huggingface_hub's, datasets') are off when stderr is a log."""
    code = ("import sys; from spectra.cli import _output_for_logs\n"
            "with _output_for_logs():\n"
            "    from transformers import AutoModelForCausalLM\n"
            f"    AutoModelForCausalLM.from_pretrained({str(tiny_ckpt)!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    quiet = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, env=env, timeout=300)
    loud = subprocess.run([sys.executable, "-c", code.replace("with _output_for_logs():", "if True:")], cwd=REPO,
                          capture_output=True, env=env, timeout=300)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:]
    assert b"\r" in loud.stderr and b"Loading weights" in loud.stderr  # transformers draws a bar of its own ...
    assert b"\r" not in quiet.stderr and b"%|" not in quiet.stderr, quiet.stderr[-500:]  # ... which the CLI turns off


def test_quickstart_pipeline_log_has_no_long_line(tmp_path, shared_data):
    """The README's first command, shortened to 30 pretraining steps: every stage's output (and any library's
    warning) is plain lines of at most 200 characters."""
    out, err = check_log(["pipeline", "--preset", "quickstart", "--steps", "30", "--runs-dir", str(tmp_path / "runs"),
                          "--run-id", "qs", "--device", "cpu"], tmp_path, every=30, timeout=900)
    assert any(line.startswith("== report done") for line in out) and (tmp_path / "runs/qs/report.html").is_file()


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, shared_data):
    """A micro run with snapshots (full gradients) and checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("logs")
    docs = wiki_docs(root / "docs.jsonl", 60)
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "6",
            "--eval-every", "6", "--save-every", "3", "--keep-checkpoints", "0", "--snapshot-every", "3",
            "--snapshot-grad", "full", "--runs-dir", str(root / "runs"), "--run-id", "r", "--device", "cpu"]
    check_log(argv, root)
    return root / "runs" / "r", docs


def test_every_long_command_logs_plain_lines(micro_run, tmp_path):
    """Each command a user runs for minutes on a real model, with stdout and stderr in files: lines of at most
    200 characters, no carriage return, no library bar, no cut table value (check_log)."""
    run, docs = micro_run
    common = ["--device", "cpu"]
    for i, argv in enumerate([
        ["spectrum", str(run), *common],
        ["grad-subspace", str(run), "--rank", "2", *common],
        ["hessian-gap", str(run), "--k", "2", "--batches", "1", "--batch-size", "2", "--seq-len", "32",
         "--iterations", "20", "--data", str(docs), *common],
        ["ranks", str(run), "--err", "0.5", *common],
        ["compress", str(run), "--err", "0.5", "--out", str(run / "compressed" / "w50"), *common],
        ["eval", str(run / "compressed" / "w50"), "--data", str(docs), "--seq-len", "32", "--tokens", "256", *common],
        ["finetune", str(run / "compressed" / "w50"), "--method", "welore", "--data", str(docs), "--steps", "2",
         "--batch-size", "2", "--micro-batch", "2", "--seq-len", "32", "--eval-tokens", "128", *common],
        ["claims", str(run)],
        ["report", str(run)],
    ]):
        (tmp_path / str(i)).mkdir()
        out, err = check_log(argv, tmp_path / str(i), every=0)
        assert out or err, argv  # each said something
