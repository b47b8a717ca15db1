"""The command line: every command registered with a one-line summary and typed --help."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import click
import pytest

from spectra.cli import COMMANDS, load_command, main


@pytest.mark.unit
@pytest.mark.parametrize("name,summary", [(n, s) for n, _, _, s in COMMANDS])
def test_listed_summary_is_the_docstring(name, summary):
    assert summary == inspect.getdoc(load_command(name)).splitlines()[0]


@pytest.mark.unit
def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, *_ in COMMANDS:
        assert f"  {name} " in out


def _click_command(name: str) -> click.Command:
    """The click command `spectra NAME` runs (built by the CLI's own lazy group)."""
    import typer

    from spectra.cli import app

    return typer.main.get_command(app).get_command(None, name)


def _flat(text: str) -> str:
    # help is wrapped to the terminal width, also after a hyphen ("--val-\n fraction")
    return re.sub(r"-\s+", "-", " ".join(text.split()))


@pytest.mark.unit
@pytest.mark.parametrize("name", [n for n, *_ in COMMANDS])
def test_command_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: spectra" in out and "--help" in out
    assert f"Usage: spectra {name} " in out
    assert _flat(inspect.getdoc(load_command(name)).split("\n\n")[0]) in _flat(out)  # the summary paragraph
    cmd = _click_command(name)
    params = [p for p in cmd.params if not getattr(p, "hidden", False)]
    rows = [l for l in out.split("Options:", 1)[1].splitlines() if l.startswith("  -")]
    listed = {o for l in rows for o in re.findall(r"--[a-z0-9-]+", re.split(r"\s{2,}", l.strip())[0])}
    want = {o for p in params if p.param_type_name == "option" for o in p.opts + p.secondary_opts} | {"--help"}
    assert listed == want and len(rows) == 1 + sum(p.param_type_name == "option" for p in params)  # one row each
    args = [p for p in params if p.param_type_name == "argument"]
    shown = (
        re.findall(r"^  (\w+)(?:\.\.\.)? ", out.split("Arguments:", 1)[1].split("Options:")[0], re.M) if args else []
    )
    assert shown == [p.name for p in args]  # every positional argument, in order
    for p in params:
        if p.help:
            assert _flat(p.help) in _flat(out), (name, p.name)  # with its whole help text


@pytest.mark.unit
def test_required_options_are_keyword(capsys):
    assert main(["hessian-gap"]) == 2  # click usage error: --ckpt missing
    assert "--ckpt" in capsys.readouterr().err


def test_input_is_a_positional_path_with_the_old_flags_as_aliases(tiny_ckpt, tmp_path, capsys):
    import json

    assert main(["ranks", str(tiny_ckpt), "--err", "0.3", "--out", str(tmp_path / "a.json")]) == 0
    assert main(["ranks", "--ckpt", str(tiny_ckpt), "--err", "0.3", "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["components"] == b["components"] and len(a["components"]) == 14
    capsys.readouterr()
    assert main(["ranks", str(tiny_ckpt), "--ckpt", str(tmp_path), "--out", str(tmp_path / "c.json")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval"]) == 2 and "missing the input" in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("spectra ")


@pytest.mark.slow
def test_config_file_sets_options_and_the_command_line_wins(tmp_path, shared_data, capsys):
    import json

    from conftest import wiki_docs

    docs = tmp_path / "docs.jsonl"
    wiki_docs(docs, 40)
    cfg = tmp_path / "pre.yaml"
    cfg.write_text(f"model: micro\ntokenizer: bytes\ndata: {docs}\nseq-len: 32\nbatch_size: 2\nmicro_batch: 2\n"
                   f"val_tokens: 256\nwarmup: 1\nsteps: 5\neval_every: 0\nsave_every: 3\nsnapshot_every: 0\n"
                   f"runs_dir: {tmp_path}\nrun_id: fromfile\n")
    assert main(["pretrain", "--config", str(cfg), "--steps", "3"]) == 0  # the command line wins over the file
    run = tmp_path / "fromfile"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    saved = json.loads((run / "run_config.json").read_text())
    assert len(rows) == 3 and saved["seq_len"] == 32 and saved["model"] == "micro" and saved["steps"] == 3
    ft = tmp_path / "ft.json"
    ft.write_text(json.dumps({"data": str(docs), "steps": 2, "batch_size": 2, "micro_batch": 2, "seq_len": 32,
                              "eval_tokens": 256, "device": "cpu", "method": "full", "out": str(tmp_path / "ft")}))
    assert main(["finetune", str(run), "--config", str(ft)]) == 0
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["method"] == "full" and m["steps"] == 2 and m["seq_len"] == 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 1}))
    capsys.readouterr()
    assert main(["finetune", str(run), "--config", str(bad)]) == 2
    assert "stepz" in capsys.readouterr().err


@pytest.mark.slow
def test_tensorboard_mirrors_the_metrics(tmp_path, shared_data):
    pytest.importorskip("tensorboard")
    import json

    from conftest import wiki_docs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    docs = tmp_path / "docs.jsonl"
    wiki_docs(docs, 40)
    assert main(["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
                 "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "3",
                 "--eval-every", "3", "--save-every", "0", "--snapshot-every", "0", "--log-to", "tensorboard",
                 "--runs-dir", str(tmp_path), "--run-id", "tb"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert [e.value for e in acc.Scalars("val_ppl")] == [pytest.approx(rows[-1]["val_ppl"], rel=1e-6)]


# --------------------------------------------------------------------------- one option system
def _shared_fields() -> dict[str, tuple[str, str]]:
    """flag -> (group.field, the help every command must show for it), from spectra/cli/args.py's groups.
    InputArgs is keyed by --ckpt only: pretrain's --model names a model size (it has no input)."""
    import dataclasses

    from spectra.cli import args
    from spectra.cli.options import option_params
    from spectra.config import flag_of

    out = {}
    for group in (args.InputArgs, args.DeviceArgs, args.TokenizerArgs, args.DataArgs, args.CalibrationArgs,
                  args.OutputArgs, args.OverwriteArgs, args.SeedArgs):
        helps = {p.name: p.annotation.__metadata__[0].help for p in option_params(group)}
        for f in dataclasses.fields(group):
            out[flag_of(f.name)] = (f"{group.__name__}.{f.name}", helps[f.name])
    return out


@pytest.mark.unit
def test_shared_options_come_from_the_shared_groups():
    """--device, --tokenizer, --data, --calib-data, --out, ... mean one thing with one help text in every command
    that has them: each is the shared group's field, never a command's own option of the same name."""
    shared = _shared_fields()
    assert {"--device", "--tokenizer", "--data", "--calib-data", "--out", "--seed", "--ckpt"} <= set(shared)
    seen: dict[str, list[str]] = {}
    wrong = []
    for name, *_ in COMMANDS:
        for p in _click_command(name).params:
            for flag in p.opts:
                if flag in shared:
                    seen.setdefault(flag, []).append(name)
                    if p.help != shared[flag][1]:
                        wrong.append((name, flag, p.help))
    assert not wrong, wrong
    assert len(seen["--device"]) >= 2 and "pretrain" in seen["--data"]  # the check has something to compare


@pytest.mark.unit
def test_the_shared_options_check_sees_a_redefined_option():
    """The check above compares real click params: a command's own --device is told apart from the group's."""
    from dataclasses import dataclass

    from spectra.cli.args import DeviceArgs
    from spectra.cli.options import option_params
    from spectra.config import opt

    @dataclass
    class Own:
        device: str = opt("cpu", "where it runs")

    group = {p.name: p.annotation.__metadata__[0].help for p in option_params(DeviceArgs)}
    own = {p.name: p.annotation.__metadata__[0].help for p in option_params(Own)}
    assert group["device"] == _shared_fields()["--device"][1] != own["device"]


# --------------------------------------------------------------------------- errors: one line, a way out
@pytest.mark.unit
def test_usage_errors_are_one_line_naming_the_help(capsys):
    assert main(["pretrain", "--no-such-flag"]) == 2
    assert capsys.readouterr().err == "error: No such option: --no-such-flag (see spectra pretrain --help)\n"
    assert main(["pretrain", "--steps"]) == 2
    assert capsys.readouterr().err == "error: Option '--steps' requires an argument (see spectra pretrain --help)\n"
    assert main(["pretrian"]) == 2
    assert capsys.readouterr().err == "error: No such command 'pretrian' (see spectra --help)\n"


CONFIG_CASES = [  # (--config YAML, the same value on the command line or None, the error)
    ("steps: 2.5", "2.5", "--steps takes an integer, not "),
    ("steps: true", None, "--steps takes an integer, not True"),
    ("steps: abc", "abc", "--steps takes an integer, not 'abc'"),
    ("lr: '0.001'", "0.001x", "--lr takes a number, not '0.001"),
    ("steps: [[1]]", None, "--steps takes an integer, not [[1]]"),
    ("betas: [[0.9], 0.95]", "0.9,0.95,0.99", "--betas takes "),
    ("steps: 0", "0", "--steps must be >= 1, not 0"),
    ("lr: 11", "11", "--lr must be in 0.0..10.0, not 11"),
    ("lr: .nan", "nan", "--lr must be a finite number, not nan"),
    ("model: huge", "huge", "--model must be one of micro, tiny, "),
    ("snapshot_steps: [0, 2.5]", "0,2.5", "--snapshot-steps takes "),
    ("stepz: 3", None, "unknown option(s) --stepz"),
]


@pytest.mark.unit
@pytest.mark.parametrize("yaml_text,flag_value,message", CONFIG_CASES)
def test_config_values_are_typed_like_flags(yaml_text, flag_value, message, tmp_path, capsys):
    """issue 19: `steps: 2.5` trained, `steps: true` trained for "1/True" steps, `lr: '0.001'` raised a
    TypeError. Now each is refused before any work, with the line the same value gets as a flag."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    assert main(["pretrain", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err
    if flag_value is not None:
        key = yaml_text.split(":")[0].replace("_", "-")
        assert main(["pretrain", f"--{key}", flag_value, "--runs-dir", str(tmp_path / "runs")]) == 2
        flag_err = capsys.readouterr().err
        assert flag_err.startswith("error: " + message) and flag_err.count("\n") == 1, flag_err
    assert not (tmp_path / "runs").exists()  # refused before anything was made


@pytest.mark.unit
def test_a_config_built_in_python_is_checked_the_same_way():
    from pretrain.configs import PretrainConfig
    from spectra.errors import SpectraError

    with pytest.raises(SpectraError, match=r"^--steps takes an integer, not 2.5$"):
        PretrainConfig(steps=2.5)
    with pytest.raises(SpectraError, match=r"^--batch-size 6 is not a multiple of --micro-batch 4$"):
        PretrainConfig(batch_size=6, micro_batch=4)
    with pytest.raises(SpectraError, match="--resume needs --run-id"):
        PretrainConfig(resume=True)
    assert PretrainConfig(steps=3.0).steps == 3 or PretrainConfig(steps=3).steps == 3


OS_CASES = [  # (errno, filename, the line's start, exit code)
    (28, None, "no space left on the device (writing --out /x/o); free space there or write elsewhere (--out)", 1),
    (28, "/x/o/a.bin", "no space left on the device writing /x/o/a.bin; free space there or write elsewhere", 1),
    (30, "/ro/o", "/ro/o is on a read-only file system; choose a writable location (--out)", 2),
    (13, "/etc/o", "permission denied: /etc/o; choose a path you may use", 2),
    (20, "/f/o", "/f/o: a part of this path is a file, not a folder; choose another path", 2),
    (40, "/l/o", "/l/o: its symbolic links form a loop; remove the loop or choose another path", 2),
    (17, "/e/o", "/e/o already exists; remove it or choose another path", 2),
    (21, "/d", "/d is a folder where a file is expected; give the path of a file", 2),
    (122, None, "disk quota exceeded (writing --out /x/o); free space there", 1),
    (5, None, "input/output error (writing --out /x/o); the disk or the file is damaged", 1),
]


@pytest.mark.unit
@pytest.mark.parametrize("code,filename,line,exit_code", OS_CASES)
def test_os_errors_name_the_path_and_the_way_out(code, filename, line, exit_code):
    import os

    from spectra.cli.failures import os_error_line

    e = OSError(code, os.strerror(code), *([filename] if filename else []))
    msg, got = os_error_line(e, ["eval", "ckpt", "--out", "/x/o"])
    assert msg.startswith(line) and got == exit_code, msg
    assert "Errno" not in msg and "OSError" not in msg


@pytest.mark.parametrize("code", [28, 30])
def test_full_or_read_only_disk_under_a_command_is_one_line(code, tmp_path, capsys, monkeypatch):
    """A disk that fills up (or turns read-only) mid-run: the line names the output flag and the way out."""
    import os

    import pretrain.loop

    def fails(cfg):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pretrain.loop, "pretrain", fails)
    assert main(["pretrain", "--runs-dir", str(tmp_path), "--tokenizer", "bytes"]) == (1 if code == 28 else 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Errno" not in err and f"--runs-dir {tmp_path}" in err, err
    assert ("no space left" if code == 28 else "read-only file system") in err


@pytest.mark.slow
def test_bad_runs_dir_paths_are_one_line(tmp_path, capsys):
    """--runs-dir under a regular file, or through a symlink loop: one line naming the path, before training."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a b c"}\n' * 20)
    base = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--steps", "1"]
    (tmp_path / "file").write_text("x")
    assert main(base + ["--runs-dir", str(tmp_path / "file" / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'file' / 'runs'}: a part of this path is a file, not a folder; choose " \
                  "another path\n", err
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert main(base + ["--runs-dir", str(tmp_path / "loop")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'loop'} is a symbolic link that leads nowhere") and \
        err.count("\n") == 1, err


def test_a_locked_run_tells_an_analysis_to_wait_not_to_change_run_id(tmp_path, capsys):
    """issue 19: analysis commands were told to "use another --run-id", a flag they lack."""
    from spectra.io.runs import run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    with run_lock(run, "pretrain"):
        assert main(["spectrum", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} is in use by spectra pretrain (pid ") and err.count("\n") == 1
    assert err.endswith("; wait for it to finish, then run spectra spectrum again\n") and "--run-id" not in err


@pytest.mark.slow  # a subprocess, interrupted
def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """issue 19: Ctrl-C exited 130 with no message at all (typer turns KeyboardInterrupt into a silent exit)."""
    import os
    import signal
    import time

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "some words for a tiny run"}\n' * 40)
    err_file = tmp_path / "err.txt"
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "16",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "64", "--warmup", "1", "--steps", "1000000",
            "--eval-every", "0", "--save-every", "0", "--snapshot-every", "0", "--runs-dir", str(tmp_path),
            "--run-id", "r", "--device", "cpu"]
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "spectra.cli", *argv], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "SPECTRA_PROGRESS_EVERY": "0"})
        try:
            deadline = time.time() + 300
            while time.time() < deadline and "pretrain micro: 2/" not in err_file.read_text():
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=300) == 130
        finally:
            proc.kill()  # never leave a million-step run behind a failed assertion
    lines = err_file.read_text().splitlines()
    assert lines[-1] == "interrupted (Ctrl-C); rerun it with --resume (and its --run-id) to continue from the latest " \
                        "checkpoint", lines[-3:]
    assert all(line.startswith("pretrain micro: ") for line in lines[:-1]), lines[-3:]


@pytest.mark.unit
def test_other_failures_users_meet_are_named():
    from spectra.cli.failures import explain

    assert explain(ModuleNotFoundError("No module named 'peft'", name="peft")) == (
        "No module named 'peft': a package this command needs is missing; install it (pip install peft)", 1)
    assert explain(RuntimeError("Symlink loop from '/r/a'"))[0].startswith("Symlink loop from '/r/a': its symbolic")
    assert explain(MemoryError())[0].startswith("out of memory; use smaller batches")
    assert explain(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))[0] == \
        "a file is not UTF-8 text (invalid start byte at byte 0); give text files in UTF-8"
    assert explain(ZeroDivisionError("division by zero")) is None  # a bug: the CLI names its type


def test_a_bug_keeps_its_type_and_debug_shows_the_traceback(capsys, monkeypatch):
    import pretrain.loop

    def bug(cfg):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pretrain.loop, "pretrain", bug)
    monkeypatch.delenv("SPECTRA_DEBUG", raising=False)
    assert main(["pretrain", "--tokenizer", "bytes"]) == 1
    assert capsys.readouterr().err == ("error: unexpected ZeroDivisionError: division by zero (a bug, or an input "
                                       "spectra does not check yet; set SPECTRA_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("SPECTRA_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["pretrain", "--tokenizer", "bytes"])
