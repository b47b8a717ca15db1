"""Bad input to `spectra eval` and `spectra finetune` (the harness of tests/test_bad_inputs.py): each case
exits non-zero with exactly one `error:` line naming the file or flag, and no pre-existing file changes.
Cases that would block or wait on the network run in a subprocess with a deadline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_refused
from test_bad_inputs import w  # noqa: F401 - `w` is the shared fixture (a tiny run, its compressed copy)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(w):  # noqa: F811 - the imported fixture
    r = w["root"]
    text = [{"text": "a first document."}, {"text": "a second one."}]
    (r / "null.jsonl").write_text("\n".join(json.dumps(x) for x in [text[0], {"text": None}, text[1]]) + "\n")
    (r / "ints.jsonl").write_text('{"text": 1}\n{"text": 5}\n')
    (r / "mixed.jsonl").write_text('{"text": "words"}\n{"text": 7}\n')
    (r / "array.json").write_text(json.dumps([text[0], text[1], {"text": ["a", "list"]}]))
    (r / "empty-dir").mkdir(exist_ok=True)
    return w


def _cases(ws) -> list[tuple[list[str], str]]:
    r, run, comp, docs, ckpt = ws["root"], ws["run"], ws["comp"], ws["docs"], ws["ckpt"]
    ev = ["eval", run, "--data", docs, "--seq-len", "32", "--tokens", "256", "--cache-dir", str(r / "cache")]
    ft = ["finetune", comp, "--data", docs, "--tokenizer", "bytes", "--steps", "2", "--batch-size", "2",
          "--micro-batch", "2", "--seq-len", "32", "--eval-tokens", "256", "--device", "cpu"]
    return [
        # eval: windows longer than the model's positions score extrapolation, not the model (ppl 1521, exit 0)
        ([*ev, "--seq-len", "2048", "--tokens", "4096"], "1024 positions"),
        ([*ev, "--seq-len", "1025", "--tokens", "2050"], "--seq-len 1025"),
        ([*ev, "--tokens", "16"], "--tokens 16"),
        ([*ev, "--err", "1.5"], "--err"),
        ([*ev, "--err", "-0.1"], "--err"),
        ([*ev, "--batch-size", "-1"], "--batch-size"),
        ([*ev, "--device", "tpu"], "tpu"),
        # eval: rows whose text is not a string, named by file and row
        ([*ev, "--data", str(r / "null.jsonl")], "null.jsonl row 2"),
        ([*ev, "--data", str(r / "ints.jsonl")], "ints.jsonl row 1"),
        ([*ev, "--data", str(r / "mixed.jsonl")], "mixed.jsonl row 2"),
        ([*ev, "--data", str(r / "array.json")], "array.json row 3"),
        ([*ev, "--data", f"{docs},{r / 'null.jsonl'}"], "null.jsonl row 2"),
        # eval: outputs it cannot append to
        ([*ev, "--out", str(r / "empty-dir")], "--out"),
        ([*ev, "--out", str(Path(docs) / "x.jsonl")], "--out"),  # under a regular file
        ([*ev, "--out", docs], "docs.jsonl"),  # a file that is not an eval table
        (["eval", str(r / "empty-dir"), "--data", docs], "no model checkpoint"),
        (["eval", run, "--ckpt", run, "--data", docs], "give the input once"),
        # finetune
        ([*ft, "--data", str(r / "null.jsonl")], "null.jsonl row 2"),
        ([*ft, "--val-data", str(r / "ints.jsonl")], "ints.jsonl row 1"),
        ([*ft, "--val-data", str(r / "nope.jsonl")], "--val-data"),
        ([*ft, "--seq-len", "2048"], "1024 positions"),
        ([*ft, "--micro-batch", "3", "--batch-size", "4"], "multiple of --micro-batch"),
        ([*ft, "--lr", "11"], "--lr"),
        ([*ft, "--eval-tokens", "0"], "--eval-tokens"),
        ([*ft, "--min-lr-ratio", "2"], "--min-lr-ratio"),
        ([*ft, "--dtype", "fp8"], "fp8"),
        ([*ft, "--log-to", "mlflow"], "mlflow"),
        ([*ft, "--out", str(r / "null.jsonl")], "--out"),
        (["finetune", ckpt, "--data", docs, "--tokenizer", "bytes", "--steps", "1", "--device", "cpu"],
         "not a compressed model"),
    ]


N_CASES = 29


def test_table_size(lm):
    assert len(_cases(lm)) == N_CASES, f"the table has {len(_cases(lm))} cases: set N_CASES to that"


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(lm, i, capsys):
    argv, fragment = _cases(lm)[i]
    assert_refused(argv, lm["root"], capsys, fragment)



def _spectra(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def _one_error_line(p: subprocess.CompletedProcess, fragment: str) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    assert fragment in errors[0], errors[0]
    return errors[0]


def test_eval_out_to_a_fifo_or_stdout_is_refused_not_hung(lm):
    """`--out /dev/stdout` hung (reading it to check it is an eval table): a pipe, FIFO or device is refused
    before any work. Run with a deadline: the old behaviour blocks forever."""
    r = lm["root"]
    fifo = r / "rows.fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    ev = ["eval", lm["run"], "--data", lm["docs"], "--seq-len", "32", "--tokens", "256", "--device", "cpu"]
    _one_error_line(_spectra([*ev, "--out", str(fifo)]), "rows.fifo is a pipe")
    p = _spectra([*ev, "--out", "/dev/stdout"])  # stdout is a pipe here
    _one_error_line(p, "/dev/stdout is a pipe")
    assert p.stdout == ""


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
def test_no_data_offline_is_one_fast_line_naming_data(lm, env):
    """Without --data the hub's C4 is used; offline (flag set, or the endpoint refusing connections) that is one
    line naming --data, without `datasets`' five retries over ~25 s ("Retrying in 8s [Retry 4/5]")."""
    p = _spectra(["eval", lm["run"], "--seq-len", "32", "--tokens", "256", "--device", "cpu"], **env)
    line = _one_error_line(p, "pass --data PATH")
    assert "no --data given" in line and "Retry" not in p.stderr
    p = _spectra(["finetune", lm["comp"], "--tokenizer", "bytes", "--steps", "1", "--batch-size", "2",
                  "--micro-batch", "2", "--seq-len", "32", "--device", "cpu", "--out", str(lm["root"] / "ft-off")],
                 **env)
    _one_error_line(p, "pass --data PATH")
    assert "Retry" not in p.stderr and not (lm["root"] / "ft-off").exists()
