"""`spectra report` with bad input: each case exits 2 with one `error:` line that names the path or option
and what to do, before any work, and no file that existed before the case changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_report import write_run

from spectra.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("badreport")
    write_run(root / "run", snapshots=False)
    (root / "empty").mkdir()
    (root / "outdir").mkdir()
    (root / "outdir" / "keep.txt").write_text("mine")
    (root / "emptyout").mkdir()
    (root / "notes.txt").write_text("not a report")
    from conftest import make_tiny

    make_tiny().save_pretrained(root / "lone")  # a real model folder that lies in no run
    os.symlink(root / "loop", root / "loop")  # a symlink to itself
    (root / "cfg-title.json").write_text(json.dumps({"title": 3}))
    (root / "cfg-unknown.json").write_text(json.dumps({"titel": "x"}))
    (root / "cfg-bad.yaml").write_text("title: [unclosed")
    return root


def _cases(r: Path) -> list[tuple[list[str], str]]:
    run = str(r / "run")
    return [
        (["report", str(r / "nope")], "no run folder at"),
        (["report", str(r / "empty")], "holds no run outputs"),
        (["report", str(r / "notes.txt")], "notes.txt is a file; pass a run folder"),
        (["report", str(r / "lone")], "lies in no run folder"),
        (["report"], "missing the input"),
        (["report", run, "--out", str(r / "notes.txt")], "notes.txt exists and is not a spectra HTML report"),
        (["report", run, "--out", str(r / "run" / "eval.jsonl")], "eval.jsonl exists and is not"),
        (["report", run, "--out", str(r / "outdir")], "outdir exists and is not"),
        (["report", run, "--out", str(r / "emptyout")], "is a folder; name the HTML file"),
        (["report", run, "--out", str(r / "notes.txt" / "r.html")], "notes.txt, which is a file"),
        (["report", run, "--out", str(r / "loop")], "broken or looping symlink"),
        (["report", run, "--config", str(r / "cfg-title.json")], "--title takes a string, not 3"),
        (["report", run, "--config", str(r / "cfg-unknown.json")], "unknown option(s) --titel"),
        (["report", run, "--config", str(r / "cfg-bad.yaml")], "is not valid YAML"),
        (["report", run, "--config", str(r / "missing.yaml")], "cannot read --config"),
        (["report", run, "--ckpt", run], "--ckpt"),  # report takes PATH only
        (["report", run, "--bogus"], "--bogus"),
    ]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
    return out


def test_bad_report_inputs_are_one_actionable_line(root, capsys):
    before = _snapshot(root)
    for argv, piece in _cases(root):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv, code, err)
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
        assert piece in err[0], (argv, err[0])
        assert "Traceback" not in err[0] and "SPECTRA_DEBUG" not in err[0], (argv, err[0])
    assert _snapshot(root) == before  # nothing written, nothing changed
    assert not (root / "run" / "report.html").exists() and os.path.islink(root / "loop")


def test_report_replaces_only_its_own_output(root, capsys):
    out = root / "made" / "r.html"
    assert main(["report", str(root / "run"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    first = out.read_bytes()
    assert main(["report", str(root / "run"), "--out", str(out), "--title", "again"]) == 0  # its own report
    assert out.read_bytes() != first and b"<title>again</title>" in out.read_bytes()
