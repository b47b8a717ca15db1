"""`spectra` command line: one typed function per command; its docstring is the --help text.

Each command lives next to the concept it runs (pretrain/loop.py, spectra/hessian.py, ...) and is
registered here by name, so `spectra --help` lists every command with a one-line summary.
"""

from __future__ import annotations

import spectra.threads  # noqa: F401, I001 - OpenMP wait policy and thread count, before anything loads torch

import importlib
import os
import sys

import typer

from spectra.errors import SpectraError, Terminated

# (command, module, function, one-line summary) -- the order is the order in `spectra --help`.
# The summary is the first docstring line of the function (tests/test_cli.py keeps them equal);
# it lives here too so `spectra --help` lists commands without importing torch (4 s -> 0.3 s).
COMMANDS: list[tuple[str, str, str, str]] = [
    ("pretrain", "pretrain.loop", "pretrain_command",
     "Pretrain a LLaMA (GaLore sizes) and write weight/gradient snapshots to runs/<id>/snapshots.zarr."),
    ("spectrum", "spectra.spectrum", "spectrum_command",
     "Singular values and heavy-tail metrics (stable/effective rank, energy, power-law alpha) of every decoder linear."),
    ("grad-subspace", "spectra.subspace", "grad_subspace_command",
     "Gradient-subspace stabilization across snapshots: overlap with the previous and final top-r subspace."),
    ("hessian-gap", "spectra.hessian", "hessian_gap_command",
     "Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos."),
    ("ranks", "spectra.ranks", "ranks_command",
     "WeLore rank map (or uniform / diagnostic baseline) for a target ERR, with a per-layer table."),
    ("compress", "spectra.lowrank", "compress_command",
     "WeLore-COMP: replace LRC linears with low-rank factors (or --merge them back to dense)."),
    ("eval", "spectra.evaluate", "eval_command",
     "Perplexity of a dense or compressed model on C4 (hub or local) or any local text."),
    ("finetune", "spectra.finetune", "finetune_command",
     "Continual finetuning of a compressed model: WeLore-PEFT (LRC factors only) or a baseline."),
    ("report", "reports.build", "report_command",
     "Interactive offline HTML report of a run: the paper figures 1-7 and Table 1."),
    ("pipeline", "spectra.pipeline", "pipeline_command",
     "Run the whole WeLore pipeline (pretrain, analyze, rank, compress, eval, finetune, report) from a preset."),
]
_SETTINGS = dict(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def load_command(name: str):
    """The typed function behind command `name` (imports its module)."""
    module, func = next((m, f) for n, m, f, _ in COMMANDS if n == name)
    return getattr(importlib.import_module(module), func)


class _LazyGroup(typer.core.TyperGroup):
    """Imports a command's module only when that command runs or shows its own --help."""

    def list_commands(self, ctx) -> list[str]:
        return [name for name, *_ in COMMANDS]

    def get_command(self, ctx, name: str):
        if name not in self.list_commands(ctx):
            return None
        one = typer.Typer(**_SETTINGS)
        one.command(name)(load_command(name))
        return typer.main.get_command(one)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, _, _, summary in COMMANDS])


app = typer.Typer(
    name="spectra",
    cls=_LazyGroup,
    help="Why LLM weights become low-rank (WeLore): pretrain with snapshots, analyze, rank, compress, finetune, report.",
    no_args_is_help=True,
    **_SETTINGS,
)


@app.callback()
def _root() -> None:
    """spectra: pretrain with snapshots, analyze (spectrum, grad-subspace, hessian-gap), rank, compress, eval, finetune, report."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one `error: ...` line and exit code 2, never a traceback."""
    import click

    try:
        code = app(args=argv, prog_name="spectra", standalone_mode=False)  # --help still prints and returns
    except SpectraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.UsageError as e:  # bad option value, unknown option, missing argument: one line
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - unexpected: one line unless debugging
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set SPECTRA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
