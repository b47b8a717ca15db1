"""A command's options are the fields of one dataclass (spectra/config.py), built from shared groups
(spectra/cli/args.py): `command_from(Args, run, doc)` makes the typer command.

The command gets one option per field (`--steps`, with its default, `[x>=1]` and choices in --help), a `--config FILE`
(YAML or JSON with the same names; the command line overrides it), and optionally the positional input
PATH (or PATHS). Every option is None until given, which is how "given" is told apart from "default";
values from the command line (as typed text) and from the file go through the same `spectra.config.build`,
so a bad value is the same one error line whichever way it came.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import typer

from spectra.config import build, choices_of, fields_of, load_config_file, seq_type, strip_optional
from spectra.errors import SpectraError

Inputs = Literal["one", "many"] | None
_MISSING = dataclasses.MISSING


_METAVAR = {int: "INTEGER", float: "NUMBER", str: "TEXT"}


def _metavar(t) -> str:
    seq = seq_type(t)
    if seq:
        return f"{_METAVAR.get(seq[1], 'TEXT')},..."
    choices = choices_of(t)
    if choices:
        return "[" + "|".join(map(str, choices)) + "]" if len(choices) <= 4 else "CHOICE"
    return _METAVAR.get(strip_optional(t), "TEXT")


def _help(f: dataclasses.Field, t) -> str:
    """The field's help, then what click would show: [choices], [default: ...; range]."""
    text = f.metadata.get("help") or ""
    choices = choices_of(t)
    if choices:
        text += f" [{'|'.join(map(str, choices))}]"
    default = f.default if f.default is not _MISSING else f.default_factory()
    if seq_type(t) and default is not None:
        default = ",".join(map(str, default))
    notes = [] if default in (None, "") or isinstance(default, bool) else [f"default: {default}"]
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None or hi is not None:
        notes.append(f"{lo}<=x<={hi}" if lo is not None and hi is not None
                     else f"x>={lo}" if lo is not None else f"x<={hi}")
    return f"{text}  [{'; '.join(notes)}]" if notes else text


def option_params(cls) -> list[inspect.Parameter]:
    """One keyword parameter per CLI field of `cls`, documented for typer. Flags (bool fields) are click
    flags; every other value reaches `build` as the text typed, so a value from the command line and one from
    --config are parsed, range-checked and refused by the same code, with the same message."""
    params = []
    for f, t in fields_of(cls):
        if not f.metadata.get("cli", True):
            continue
        flags = f.metadata.get("flag")
        flags = [flags] if isinstance(flags, str) else list(flags or [])
        flag = strip_optional(t) is bool
        info = typer.Option(*flags, help=_help(f, t), show_default=False, metavar=None if flag else _metavar(t))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[bool if flag else str], info]))
    return params


_INPUT_HELP = {
    "one": "The input: a run folder, a checkpoint or compressed folder, a snapshots.zarr, or a hub name "
    "org/name[@revision].",
    "many": "The input(s): a run folder or snapshots.zarr, or one or more checkpoint folders / hub revisions "
    "(a series; quoted globs expand).",
}


def command_from(cls, run: Callable[..., Any], doc: str, *, inputs: Inputs = None,
                 input_help: str | None = None, extra: list[inspect.Parameter] | None = None) -> Callable:
    """A typer command whose options are the fields of dataclass `cls`; it calls `run(cls(...))`, or
    `run(cls(...), path)` / `run(cls(...), paths)` with `inputs="one"` / `"many"`."""
    params = []
    if inputs:
        ann = Optional[list[str]] if inputs == "many" else Optional[str]
        params.append(inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=Annotated[ann, typer.Argument(help=input_help or _INPUT_HELP[inputs],
                                                                                 show_default=False)]))
    params += option_params(cls) + list(extra or [])
    extra_names = [p.name for p in extra or []]
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option(help="YAML or JSON file of these options (the command "
                                                               "line overrides it)")]))

    def command(**kwargs):
        path = kwargs.pop("path", None) if inputs else None
        cfg_file = kwargs.pop("config", None)
        more = {k: kwargs.pop(k, None) for k in extra_names}  # command-line-only parameters, passed through
        values = load_config_file(cfg_file) if cfg_file else {}
        given = {k: v for k, v in kwargs.items() if v is not None}
        values.update(given)
        args = build(cls, values, text=set(given))
        if not inputs:
            return run(args, **more)
        alias = getattr(args, "ckpt", None)
        if path and alias:
            raise SpectraError("give the input once: as PATH or as --ckpt/--model, not both")
        if not (path or alias):
            raise SpectraError("missing the input: pass PATH (or --ckpt PATH): a run, a checkpoint folder, a "
                               "snapshots.zarr or a hub name")
        if inputs == "many":
            return run(args, list(path) if path else [alias], **more)
        return run(args, path or alias, **more)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = getattr(run, "__name__", "command").lstrip("_") or "command"
    return command
