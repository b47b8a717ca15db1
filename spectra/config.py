"""Typed settings: one dataclass field per option, with its help, range and choices, checked the same way
whether a value comes from Python, the command line or a `--config` file.

    @dataclass
    class PretrainConfig:
        steps: int = opt(20000, "optimizer steps", min=1)
        snapshot_grad: Literal["full", "sketch", "none"] = opt("sketch", "gradient in snapshots")

`build(PretrainConfig, {"steps": 2.5})` raises one line: "--steps takes an integer, not 2.5". The CLI
(spectra/cli/options.py) turns the same fields into options and hands their text to `build(..., text=names)`,
which parses it by the same types and ranges, so `--steps 2.5` and `steps: 2.5` in a --config file are the same
error, and so are `--lr 0.001x` and `lr: '0.001'` (a quoted number in a file is a string, not a number).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError

_MISSING = dataclasses.MISSING


def opt(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    cli: bool = True,
    flag: str | tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field that is also a CLI option (`cli=False`: config file only; `flag`: its spelling(s))."""
    meta = {"help": help, "min": min, "max": max, "cli": cli, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def seq_type(t) -> tuple[type, type] | None:
    """(container, element) for list[int] / tuple[float, float] fields, else None."""
    t = strip_optional(t)
    origin = typing.get_origin(t)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    return None


def choices_of(t) -> tuple | None:
    t = strip_optional(t)
    return typing.get_args(t) if typing.get_origin(t) is typing.Literal else None


def strip_optional(t):
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def is_optional(t) -> bool:
    return type(None) in typing.get_args(t)


def fields_of(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _scalar(v, t, name: str):
    """`v` as the scalar type `t`, strictly: no bool for numbers, no float with a fraction for ints, no
    string for numbers from a config file (a quoted '0.001' is a typo a user should hear about)."""
    bad = SpectraError(f"{flag_of(name)} takes {_WHAT.get(t) or t.__name__}, not {v!r}")
    if t is bool:
        if isinstance(v, bool):
            return v
        raise bad
    if t is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise bad
        return int(v)
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        return float(v)
    if t is str:
        if isinstance(v, (str, Path)):
            return str(v)
        raise bad
    return v


def parse_seq(value: str, container: type, elem: type, name: str):
    try:
        items = [elem(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise SpectraError(f"{flag_of(name)} takes comma-separated {elem.__name__}s, not {value!r}") from None
    return container(items)


def coerce(name: str, v, t, meta: dict):
    """One value checked against its field: type, arity, choices and range; one error line naming the option."""
    if v is None:
        if is_optional(t):
            return None
        raise SpectraError(f"{flag_of(name)} needs a value")
    seq = seq_type(t)
    if seq:
        container, elem = seq
        if isinstance(v, str):
            v = parse_seq(v, container, elem, name)
        elif not isinstance(v, (list, tuple)):
            raise SpectraError(f"{flag_of(name)} takes a list of {elem.__name__}s, not {v!r}")
        v = container(_scalar(x, elem, name) for x in v)
        args = typing.get_args(strip_optional(t))
        if container is tuple and Ellipsis not in args and len(v) != len(args):
            raise SpectraError(f"{flag_of(name)} takes {len(args)} comma-separated values, not {len(v)}")
        items = v
    else:
        base = strip_optional(t)
        choices = choices_of(t)
        if choices:
            if v not in choices:
                raise SpectraError(f"{flag_of(name)} must be one of {', '.join(map(str, choices))}, not {v!r}")
            return v
        v = _scalar(v, base, name) if base in (int, float, bool, str) else v
        items = [v]
    lo, hi = meta.get("min"), meta.get("max")
    for x in items:
        if isinstance(x, float) and not math.isfinite(x):
            raise SpectraError(f"{flag_of(name)} must be a finite number, not {x}")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                rng = (f"in {lo}..{hi}" if lo is not None and hi is not None
                       else f">= {lo}" if lo is not None else f"<= {hi}")
                raise SpectraError(f"{flag_of(name)} must be {rng}, not {x}")
    return v


_WHAT = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def parse_text(name: str, text: str, t):
    """A value typed on the command line, as field type `t` wants it (then checked by `coerce`)."""
    seq = seq_type(t)
    if seq:
        return parse_seq(text, *seq, name)
    choices = choices_of(t)
    if choices:  # matched by spelling: Literal[1, 2] takes "1"
        return next((c for c in choices if str(c) == text), text)
    base = strip_optional(t)
    try:
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        raise SpectraError(f"{flag_of(name)} takes {_WHAT[base]}, not {text!r}") from None
    if base is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
        return text.lower() in ("true", "1", "yes")
    return text


def build(cls, values: dict, *, text: set[str] | frozenset[str] = frozenset()):
    """cls(**values), every value checked by `coerce`; an unknown key is one error line. Values named in
    `text` are command-line text, parsed first by their field's type (`parse_text`)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SpectraError(f"unknown option(s) {', '.join(flag_of(u) for u in unknown)}")
    out = {}
    for f, t in fields_of(cls):
        if f.name in values:
            v = values[f.name]
            if f.name in text and isinstance(v, str):
                v = parse_text(f.name, v, t)
            out[f.name] = coerce(f.name, v, t, f.metadata)
    return cls(**out)


def validate(obj) -> None:
    """Check a config built in Python (`PretrainConfig(steps=2.5)`) by the same rules as the CLI."""
    for f, t in fields_of(type(obj)):
        coerce(f.name, getattr(obj, f.name), t, f.metadata)


def load_config_file(path: str | Path) -> dict:
    """Option values from a YAML or JSON file (keys with - or _), as a dict; one error line if unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpectraError(f"cannot read --config {path}: {e}") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - a parse error is one line
        raise SpectraError(f"--config {path} is not valid {'YAML' if yaml_file else 'JSON'}: "
                           f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise SpectraError(f"--config {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
