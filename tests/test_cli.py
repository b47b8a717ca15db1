"""The command line: every command registered with a one-line summary and typed --help."""

from __future__ import annotations

import pytest

from spectra.cli import COMMANDS, app, main


def test_every_listed_command_is_registered():
    registered = {c.name for c in app.registered_commands}
    assert registered == {name for name, _, _ in COMMANDS}


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize("name", [n for n, _, _ in COMMANDS])
def test_command_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: spectra" in out and "--help" in out


def test_required_options_are_keyword(capsys):
    assert main(["hessian-gap"]) == 2  # click usage error: --ckpt missing
    assert "--ckpt" in capsys.readouterr().err
