"""`spectra` command line: one typed function per command; its docstring is the --help text.

Each command lives next to the concept it runs (pretrain/loop.py, spectra/analysis/hessian.py, ...) and is
registered here by name, so `spectra --help` lists every command with a one-line summary.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

import spectra.threads  # noqa: F401 - OpenMP wait policy and thread count (spectra/threads.py), before torch loads
from spectra.errors import SpectraError, Terminated

# (command, module, function, one-line summary) -- the order is the order in `spectra --help`.
# The summary is the first docstring line of the function (tests/test_cli.py keeps them equal);
# it lives here too so `spectra --help` lists commands without importing torch (4 s -> 0.3 s).
COMMANDS: list[tuple[str, str, str, str]] = [
    (
        "pretrain",
        "spectra.cli.pretrain",
        "command",
        "Pretrain a LLaMA (GaLore sizes) and write weight/gradient snapshots to runs/<id>/snapshots.zarr.",
    ),
    (
        "spectrum",
        "spectra.cli.spectrum",
        "command",
        "Singular values and heavy-tail metrics (stable/effective rank, energy, power-law alpha) of every "
        "decoder linear.",
    ),
    (
        "grad-subspace",
        "spectra.cli.grad_subspace",
        "command",
        "Gradient-subspace stabilization across snapshots: overlap with the previous and final top-r subspace.",
    ),
    (
        "hessian-gap",
        "spectra.cli.hessian_gap",
        "command",
        "Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos.",
    ),
    (
        "ranks",
        "spectra.cli.ranks",
        "command",
        "WeLore rank map (or uniform / diagnostic baseline) for a target ERR, with a per-layer table.",
    ),
    (
        "compress",
        "spectra.cli.compress",
        "command",
        "WeLore-COMP: replace LRC linears with low-rank factors (or --merge them back to dense).",
    ),
    (
        "sweep",
        "spectra.cli.sweep",
        "command",
        "Every rank map × {plain, whitened} × ERR, by rank and by params: perplexity table in the analysis store.",
    ),
    (
        "eval",
        "spectra.cli.eval",
        "command",
        "Perplexity of a dense or compressed model on C4 (hub or local) or any local text.",
    ),
    (
        "finetune",
        "spectra.cli.finetune",
        "command",
        "Continual finetuning of a compressed model: WeLore-PEFT (LRC factors only) or a baseline.",
    ),
    (
        "report",
        "spectra.cli.report",
        "command",
        "Interactive offline HTML report of a run: the paper figures 1-7 and Table 1.",
    ),
    (
        "pipeline",
        "spectra.cli.pipeline",
        "command",
        "Run the whole WeLore pipeline (pretrain, analyze, rank, compress, eval, finetune, report) from a preset.",
    ),
]
_SETTINGS = dict(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


# commands that write into the run folder their input lies in: they hold its lock while they run
# (pretrain takes its own; pipeline's stages are library calls inside one process)
LOCKED = {"spectrum", "grad-subspace", "hessian-gap", "ranks", "compress", "eval", "finetune", "report", "sweep"}
INPUTS = ("path", "paths", "run", "ckpt", "model")  # the keyword that names a command's input


def _locked(name: str, func):
    import functools

    @functools.wraps(func)  # typer reads the wrapped signature
    def run(**kwargs):
        from pathlib import Path

        from spectra.io.runs import run_dir_of, run_lock

        src = next((kwargs[k] for k in INPUTS if kwargs.get(k)), None)
        if isinstance(src, (list, tuple)):
            src = src[0] if len(src) == 1 else None
        run_dir = run_dir_of(src) if src is not None and Path(str(src)).exists() else None
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 holds the lock for all ranks
            run_dir = None
        with run_lock(run_dir, name):
            return func(**kwargs)

    return run


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
        func = load_command(name)
        one.command(name)(_locked(name, func) if name in LOCKED else func)
        return typer.main.get_command(one)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, _, _, summary in COMMANDS])


app = typer.Typer(
    name="spectra",
    cls=_LazyGroup,
    help="Why LLM weights become low-rank (WeLore): pretrain with snapshots, analyze, rank, compress, finetune, "
    "report.",
    no_args_is_help=True,
    **_SETTINGS,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("spectra")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        print(f"spectra {v}")
        raise typer.Exit()


@app.callback()
def _root(
    components: str = typer.Option(
        None,
        "--components",
        metavar="q=REGEX,k=REGEX,...",
        help="Map the paper's components onto module names yourself (models the registry "
        "does not know): each regex is searched in module names, its first group is "
        "the layer.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """spectra: pretrain with snapshots, analyze (spectrum, grad-subspace, hessian-gap), rank, compress, eval,
    finetune, report."""
    if components or "spectra.models.components" in sys.modules:  # torch only when needed: --help stays fast
        from spectra.models.components import set_override

        set_override(components)


def _close_bars() -> None:
    """Close progress bars still open (an error mid-loop), so the error line starts a line of its own."""
    if "spectra.progress" in sys.modules:  # no bar can be open if no command made one
        sys.modules["spectra.progress"].close_open_bars()


def _usage_message(text: str) -> str:
    """click's choice error, said the way spectra's own checks say it: "unknown --method 'dora'; choose ..."."""
    import re

    text = _one_line(text)
    m = re.fullmatch(r"Invalid value for '(--[\w-]+)': (?:Value error, )?'(.*)' is not one of (.*?)\.?", text)
    if not m:
        return text
    choices = [c.strip().strip("'") for c in m[3].split(",")]
    said = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    return f"unknown {m[1]} {m[2]!r}: {m[1]} must be {said}"


def _one_line(text: str, limit: int = 1000) -> str:
    """Messages from libraries can span lines; the CLI promises exactly one."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input becomes one `error: ...` line and exit code 2, never a traceback."""
    try:
        code = app(args=argv, prog_name="spectra", standalone_mode=False)  # --help still prints and returns
    except SpectraError as e:
        _close_bars()
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - click's own exceptions (typer may vendor click: match by name)
        _close_bars()
        kinds = {c.__name__ for c in type(e).__mro__}
        if "UsageError" in kinds:  # bad option value, unknown option, missing argument: one line
            print(f"error: {_usage_message(e.format_message())}", file=sys.stderr)
            return 2
        if "Abort" in kinds:
            print("interrupted", file=sys.stderr)
            return 130
        if "Exit" in kinds:
            return getattr(e, "exit_code", 0)
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        print(
            f"error: {type(e).__name__}: {_one_line(str(e), 300)} (set SPECTRA_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
