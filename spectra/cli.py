"""`spectra` command line: one typed function per command; its docstring is the --help text.

Each command lives next to the concept it runs (pretrain/loop.py, spectra/hessian.py, ...) and is
registered here by name, so `spectra --help` lists every command with a one-line summary.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from spectra.errors import SpectraError

# (command, module, function) -- the order is the order in `spectra --help`
COMMANDS: list[tuple[str, str, str]] = [
    ("pretrain", "pretrain.loop", "pretrain_command"),
    ("spectrum", "spectra.spectrum", "spectrum_command"),
    ("grad-subspace", "spectra.subspace", "grad_subspace_command"),
    ("hessian-gap", "spectra.hessian", "hessian_gap_command"),
    ("ranks", "spectra.ranks", "ranks_command"),
    ("compress", "spectra.lowrank", "compress_command"),
    ("eval", "spectra.evaluate", "eval_command"),
    ("finetune", "spectra.finetune", "finetune_command"),
    ("report", "reports.build", "report_command"),
    ("pipeline", "spectra.pipeline", "pipeline_command"),
]

app = typer.Typer(
    name="spectra",
    help="Why LLM weights become low-rank (WeLore): pretrain with snapshots, analyze, rank, compress, finetune, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register() -> None:
    for name, module, func in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # a command whose module is not built yet is simply absent
            if e.name != module:
                raise
            continue
        if hasattr(mod, func):  # tests/test_cli.py checks that every listed command is registered
            app.command(name)(getattr(mod, func))


_register()


@app.callback()
def _root() -> None:
    """spectra: pretrain with snapshots, analyze (spectrum, grad-subspace, hessian-gap), rank, compress, eval, finetune, report."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one `error: ...` line and exit code 2, never a traceback."""
    try:
        app(args=argv, prog_name="spectra")  # typer/click handle --help and usage errors themselves
    except SpectraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - unexpected: one line unless debugging
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set SPECTRA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
