"""`spectra` command line: one typed function per command; its docstring is the --help text.

Each command is a thin file spectra/cli/<command>.py exposing `command`, registered here by name, so
`spectra --help` lists every command with a one-line summary. A command file imports the library (torch,
transformers) only inside its function: `spectra CMD --help` and a bad flag never load them
(tests/test_startup.py). `main` turns every failure into one `error: ...` line (spectra/cli/failures.py).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

import spectra.threads  # noqa: F401 - OpenMP wait policy and thread count (spectra/threads.py), before torch loads
from spectra.cli.failures import explain, interrupted_line
from spectra.errors import SpectraError, Terminated
from spectra.io.runs import run_dir_of, run_lock

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
        "claims",
        "spectra.cli.claims",
        "command",
        "What the WeLore paper claims, and what this run shows: one row per claim with effect, CI, p, n, verdict.",
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
        "Every rank map × variant × ERR (by params, or by rank): perplexity with bootstrap CIs, in the analysis store.",
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
        "Run the whole WeLore pipeline (pretrain, analyze, rank, compress, eval, finetune, claims, report) from a "
        "preset.",
    ),
]
_SETTINGS = dict(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


# commands that write into the run folder their input lies in: they hold its lock while they run
# (pretrain takes its own; pipeline's stages are library calls inside one process)
LOCKED = {"spectrum", "grad-subspace", "hessian-gap", "claims", "ranks", "compress", "eval", "finetune", "report",
          "sweep"}
INPUTS = ("path", "paths", "run", "ckpt", "model")  # the keyword that names a command's input


class _Interrupted(BaseException):
    """Ctrl-C inside a command. Typer turns a KeyboardInterrupt into a silent exit 130; this one passes through
    it to `main`, which says so."""


def _guarded(name: str, func):
    """The command as the CLI runs it: holding the lock of the run its input lies in (LOCKED commands), with
    Ctrl-C carried out to `main`."""

    @functools.wraps(func)  # typer reads the wrapped signature
    def run(**kwargs):
        run_dir = None
        if name in LOCKED and int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 locks for all
            src = next((kwargs[k] for k in INPUTS if kwargs.get(k)), None)
            if isinstance(src, (list, tuple)):
                src = src[0] if len(src) == 1 else None
            run_dir = run_dir_of(src) if src is not None and Path(str(src)).exists() else None
        try:
            with _output_for_logs(), run_lock(run_dir, name):
                return func(**kwargs)
        except KeyboardInterrupt:
            raise _Interrupted() from None

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
        one.command(name)(_guarded(name, func))
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


def _one_line(text: str, limit: int = 1000) -> str:
    """Messages from libraries can span lines; the CLI promises exactly one."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


LOG_COLUMNS = "1000"  # rich's width when stdout is a file: tables at their natural width, no "0.01…"


@contextmanager
def _output_for_logs():
    """Output that reads well in a log file: rich tables at full width when stdout is not a terminal (rich
    takes its width from COLUMNS, else 80), and the libraries' own tqdm bars off when stderr is not one.
    Entered when a command runs (so --help imports no tqdm), before it imports the libraries."""
    from spectra.progress import quiet_third_party_bars, show, shown

    quiet_third_party_bars()
    if not _isatty(sys.stderr):
        _one_line_log_records()
    was_shown = shown()
    show(True)  # a command shows its progress; the API alone prints nothing
    if not _isatty(sys.stdout) and not isinstance(sys.stdout, _FoldingWriter):
        sys.stdout = _FoldingWriter(sys.stdout)  # restored below
    set_columns = "COLUMNS" not in os.environ and not _isatty(sys.stdout)
    if set_columns:
        os.environ["COLUMNS"] = LOG_COLUMNS
    try:
        yield
    finally:
        if isinstance(sys.stdout, _FoldingWriter):
            sys.stdout.flush()
            sys.stdout = sys.stdout.stream
        show(was_shown)
        if set_columns and os.environ.get("COLUMNS") == LOG_COLUMNS:
            del os.environ["COLUMNS"]


class _FoldingWriter:
    """stdout in a log file: a result line longer than 200 characters (long paths) is folded at spaces into
    lines of at most 200, continuation lines indented; table rows (box-drawing characters) are left whole."""

    def __init__(self, stream, width: int = 200):
        self.stream, self.width, self._part = stream, width, ""

    def write(self, text: str) -> int:
        import textwrap

        lines = (self._part + text).split("\n")
        self._part = lines.pop()
        for line in lines:
            if len(line) <= self.width or any("\u2500" <= ch <= "\u257f" for ch in line):
                self.stream.write(line + "\n")
            else:
                self.stream.write("\n".join(textwrap.wrap(line, self.width, subsequent_indent="    ",
                                                         break_long_words=False, break_on_hyphens=False)) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._part:
            self.stream.write(self._part)
            self._part = ""
        self.stream.flush()

    def __getattr__(self, name):  # encoding, fileno, isatty, ...: the stream's
        return getattr(self.stream, name)


def _one_line_log_records() -> None:
    """In a log file, other libraries' warnings (Python warnings, `logging` records) become one line each of at
    most 200 characters, like spectra's own: a deprecation notice or a kernel-loading note is no wall of text."""
    import logging
    import warnings

    from spectra.progress import fit_line as cut

    def show(message, category, filename, lineno, file=None, line=None):
        print(cut(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"), file=file or sys.stderr)

    warnings.showwarning = show

    class OneLine(logging.Formatter):
        def format(self, record):
            return cut(f"{record.levelname.lower()}: {record.name}: {record.getMessage()}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    logging.lastResort = handler  # what prints a library's record when no handler was configured


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


def _close_open_bars() -> None:
    """A bar left open by the error would glue itself to the line (no bar was made if no command ran)."""
    if "spectra.progress" in sys.modules:
        sys.modules["spectra.progress"].close_open_bars()


def _fail(message: str, code: int) -> int:
    _close_open_bars()
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure becomes one `error: ...` line and an exit code, never a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args, prog_name="spectra", standalone_mode=False)  # --help prints and returns
    except SpectraError as e:
        return _fail(str(e), 2)
    except (KeyboardInterrupt, _Interrupted):
        _close_open_bars()
        print(interrupted_line(args, "Ctrl-C"), file=sys.stderr)
        return 130
    except Terminated:
        _close_open_bars()
        print(interrupted_line(args, "SIGTERM"), file=sys.stderr)
        return 143
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - click's own exceptions (typer vendors click: matched by name)
        kinds = {c.__name__ for c in type(e).__mro__}
        if "UsageError" in kinds:  # unknown option, missing value or argument: one line, and where help is
            command = next((a for a in args if a in {n for n, *_ in COMMANDS}), None)
            where = f"spectra {command}" if command else "spectra"
            return _fail(f"{_one_line(e.format_message()).rstrip('.')} (see {where} --help)", 2)
        if "Exit" in kinds:
            return getattr(e, "exit_code", 0)
        if "Abort" in kinds:
            return _fail("aborted", 1)
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        known = explain(e, args)
        if known is not None:
            return _fail(*known)
        return _fail(f"unexpected {type(e).__name__}: {_one_line(str(e), 300)} (a bug, or an input spectra does "
                     "not check yet; set SPECTRA_DEBUG=1 for the traceback)", 1)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
