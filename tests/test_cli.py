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


@pytest.mark.slow  # a fresh interpreter
def test_top_level_help_imports_no_torch():
    code = "import sys; from spectra.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("False") and "hessian-gap" in out


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
