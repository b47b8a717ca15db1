"""One definition per option: a dataclass field (type, default, help, range) becomes the CLI option.

    @dataclass
    class PretrainConfig:
        steps: int = opt(20000, "optimizer steps", min=1)
        snapshot_grad: Literal["full", "sketch", "none"] = opt("sketch", "gradient in snapshots")

    pretrain_command = command_from(PretrainConfig, pretrain, "Pretrain a LLaMA ...")

The command gets `--steps` (with `[x>=1]` in --help) and `--config FILE` (YAML or JSON with the
same field names); options given on the command line override the file, the file overrides the
defaults (every option is None until given, which is how "given" is told apart from "default").
Closed choices are `Literal`s, so typer lists and checks them. Lists take comma-separated
values (`--snapshot-steps 0,100,1000`), pairs too (`--betas 0.9,0.95`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from spectra.errors import SpectraError

_MISSING = dataclasses.MISSING


def opt(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    cli: bool = True,
    flag: str | None = None,
) -> Any:
    """A dataclass field that is also a CLI option (`cli=False`: config file only)."""
    meta = {"help": help, "min": min, "max": max, "cli": cli, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _seq_type(t) -> tuple[type, type] | None:
    """(container, element) for list[int] / tuple[float, float] fields, else None."""
    origin = typing.get_origin(t)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    return None


def _parse_seq(value: str | None, container: type, elem: type, name: str):
    if value is None:
        return None
    try:
        items = [elem(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise SpectraError(
            f"--{name.replace('_', '-')} takes comma-separated {elem.__name__}s, not {value!r}"
        ) from None
    return container(items)


def _cli_type(t):
    """The type typer sees for a field type (sequences travel as one comma-separated string)."""
    if _seq_type(t):
        return Optional[str]
    return t


def config_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def load_config_file(path: Path, known: set[str]) -> dict:
    """Option values from a YAML or JSON file; a key not in `known` is one clear error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpectraError(f"cannot read --config {path}: {e}") from None
    try:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - a parse error is one line
        raise SpectraError(
            f"--config {path} is not valid "
            f"{'YAML' if Path(path).suffix in ('.yaml', '.yml') else 'JSON'}: "
            f"{' '.join(str(e).split())[:200]}"
        ) from None
    if not isinstance(data, dict):
        raise SpectraError(f"--config {path} must hold a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpectraError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return data


def build(cls, values: dict):
    """cls(**values) with file values coerced to the field types and checked against the ranges."""
    out = {}
    for f, t in config_fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        seq = _seq_type(t)
        if seq and isinstance(v, str):
            v = _parse_seq(v, *seq, f.name)
        elif seq and isinstance(v, (list, tuple)):
            v = seq[0](v)
        arity = len(typing.get_args(t)) if seq and seq[0] is tuple and Ellipsis not in typing.get_args(t) else None
        if arity is not None and len(v) != arity:
            raise SpectraError(f"--{f.name.replace('_', '-')} takes {arity} comma-separated values, not {len(v)}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
                raise SpectraError(f"--{f.name.replace('_', '-')} {v} is out of range {rng}")
        choices = typing.get_args(t) if typing.get_origin(t) is typing.Literal else None
        if choices and v not in choices:
            raise SpectraError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, not {v!r}")
        out[f.name] = v
    return cls(**out)


def command_from(
    cls, run: Callable[[Any], Any], doc: str, *, config: bool = True, extra: list[inspect.Parameter] | None = None
) -> Callable:
    """A typer command whose options are the fields of dataclass `cls`; it calls run(cls(...), **extra)."""
    params = list(extra or [])
    for f, t in config_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default = f.default if f.default is not _MISSING else f.default_factory()
        seq = _seq_type(t)
        shown = ",".join(map(str, default)) if seq else default
        # every option defaults to None ("not given"), so a --config file can fill it; --help shows the real default
        info = typer.Option(
            *([f.metadata["flag"]] if f.metadata.get("flag") else []),
            help=f.metadata.get("help"),
            min=f.metadata.get("min"),
            max=f.metadata.get("max"),
            show_default=str(shown) if shown not in (None, "") else False,
        )
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[_cli_type(t)], info]
            )
        )
    if config:
        params.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    Optional[Path],
                    typer.Option(help="YAML or JSON file of these options (the command line overrides it)"),
                ],
            )
        )
    extra_names = {p.name for p in extra or []}

    def command(**kwargs):
        path = kwargs.pop("config", None)
        values = load_config_file(path, {f.name for f in dataclasses.fields(cls)}) if path else {}
        values.update({k: v for k, v in kwargs.items() if v is not None and k not in extra_names})
        return run(build(cls, values), **{k: kwargs.get(k) for k in extra_names})

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = getattr(run, "__name__", "command")
    return command


def _config_callback(ctx, param, value):
    """--config FILE for a hand-written command: the file's values become click's default_map, so an
    option given on the command line still wins and an option in neither keeps its default."""
    if value is None:
        return value
    data = load_config_file(value, {p.name for p in ctx.command.params})
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


CONFIG_OPTION = typer.Option("--config", is_eager=True, callback=_config_callback, expose_value=True,
                             help="YAML or JSON file of this command's options (the command line overrides it)")
