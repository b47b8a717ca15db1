"""The command line: every command registered with a one-line summary and typed --help."""

from __future__ import annotations

import pytest

import inspect
import subprocess
import sys

from spectra.cli import COMMANDS, load_command, main


@pytest.mark.parametrize("name,summary", [(n, s) for n, _, _, s in COMMANDS])
def test_listed_summary_is_the_docstring(name, summary):
    assert summary == inspect.getdoc(load_command(name)).splitlines()[0]


def test_top_level_help_imports_no_torch():
    code = "import sys; from spectra.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("False") and "hessian-gap" in out


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, *_ in COMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", [n for n, *_ in COMMANDS])
def test_command_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: spectra" in out and "--help" in out


def test_required_options_are_keyword(capsys):
    assert main(["hessian-gap"]) == 2  # click usage error: --ckpt missing
    assert "--ckpt" in capsys.readouterr().err
