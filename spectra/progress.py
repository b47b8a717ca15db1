"""Progress bars that read well both in a terminal and in a log file.

On a TTY this is tqdm. When stderr is a file or a pipe (nohup, sbatch, `2> log`), a tqdm bar
becomes one line of carriage returns (a 150-step pretrain wrote one 34,829-character line), so
there the same calls write plain lines instead, at most one every `every` seconds (default 30,
`SPECTRA_PROGRESS_EVERY` overrides) plus one when the work ends:

    pretrain 9m: 40/150 (27%) 1.9 it/s, elapsed 0:00:21, ETA 0:00:58, loss=2.31 lr=3.0e-03

`progress_bar` takes tqdm's arguments (`total`, `desc`, `unit`, `initial`, `disable`, `leave`,
`position`) and returns an object with tqdm's `update`, `set_postfix`, `set_description`,
`close`, iteration and `with`, so a call site swaps `tqdm(...)` for `progress_bar(...)`.
`overall(items, desc)` is the bar over many items of work (components, ERRs, runs): it names the
item being worked on and gives N-of-M and an ETA; per-item bars go under it with `position=1`.

`close_open_bars()` closes every bar `progress_bar` made that is still open. A bar iterated by a
loop that raised stays open while the traceback holds the loop's frame (its `finally` runs only
when the generator is collected), so the CLI calls it before printing its one error line: the
line then starts a line of its own instead of being glued to a half-drawn bar.

`note(text)` is the library's one other way to say something (a status line: "starting over", "downloading
..."): a line on stderr that does not break a bar. `quiet_third_party_bars()` (the CLI calls it once, at entry)
turns transformers', huggingface_hub's and datasets' own tqdm bars off when stderr is a log, where each would
be one line of carriage returns; on a terminal they stay. Every log line is at most `MAX_LINE` characters.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm.auto import tqdm  # a notebook's widget bar in Jupyter, the text bar elsewhere
from transformers.utils import logging as hf_logging

DEFAULT_EVERY = 30.0  # seconds between plain lines
MAX_LINE = 200  # characters in one log line; a longer one is cut (its end is the least useful part)
# the libraries' own switches for their bars; read when each library is imported (a user's setting wins)
THIRD_PARTY_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_MADE: weakref.WeakSet = weakref.WeakSet()  # bars progress_bar made (closing twice is a no-op for both kinds)


def _hms(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _every(every: float | None) -> float:
    if every is not None:
        return float(every)
    try:
        return float(os.environ.get("SPECTRA_PROGRESS_EVERY", DEFAULT_EVERY))
    except ValueError:
        return DEFAULT_EVERY


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class LineBar:
    """tqdm's interface, writing a plain progress line at most every `every` seconds (and at the end)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, leave: bool = True,
                 every: float | None = None, file: TextIO | None = None, clock=time.monotonic, **_ignored):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start = initial
        self.disable, self.leave, self.every = disable, leave, _every(every)
        self.file, self.clock = file, clock
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = clock()
        self.last_n = -1  # n at the last line written
        self.closed = False
        self._write()  # one line at the start: the log shows the work began and how much there is

    # tqdm API ------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every:
            self._write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = {"": s} if s else {}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        self._write()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave or self.n != self.last_n:
                self._write(final=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the line ------------------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        elapsed = self.clock() - self.t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            head += f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        else:
            head += f"{self.n} {self.unit}"
        parts = [head]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_hms(elapsed)}")
        if final:
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif self.total and rate > 0:
            parts.append(f"ETA {_hms((self.total - self.n) / rate)}")
        post = " ".join(f"{k}={_fmt_value(v)}" if k else str(v) for k, v in self.postfix.items())
        return ", ".join(parts) + (f", {post}" if post else "")

    def _write(self, final: bool = False) -> None:
        self.last, self.last_n = self.clock(), self.n
        if self.disable:
            return
        f = self.file if self.file is not None else sys.stderr
        print(fit_line(self.line(final)), file=f, flush=True)


def fit_line(text: str) -> str:
    text = " ".join(text.split())  # one line: a desc or postfix may hold a newline or a carriage return
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def is_tty(file: TextIO | None = None) -> bool:
    f = file if file is not None else sys.stderr
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):  # closed or not a stream
        return False


_SHOWN = [False]  # the library's bars are off until a command (or the user) turns them on: the API prints nothing


def show(on: bool = True) -> None:
    """Turn spectra's progress bars on (every command does) or off (the default for the Python API)."""
    _SHOWN[0] = bool(on)


def shown() -> bool:
    return _SHOWN[0]


def progress_bar(iterable: Iterable | None = None, *, tty: bool | None = None, every: float | None = None,
                 file: TextIO | None = None, **kwargs):
    """A tqdm bar on a TTY, a `LineBar` otherwise (`tty` forces one; `every` only affects lines); disabled
    unless `show()` turned bars on."""
    if not _SHOWN[0]:
        kwargs["disable"] = True
    if (is_tty(file) or _in_notebook()) if tty is None else tty:
        kwargs.setdefault("dynamic_ncols", True)
        bar = tqdm(iterable, file=file, **kwargs)
    else:
        bar = LineBar(iterable, every=every, file=file, **kwargs)
    _MADE.add(bar)
    return bar


def _in_notebook() -> bool:
    """Jupyter's stderr is no TTY, yet tqdm.auto draws a widget there that a log never sees."""
    return "ipykernel" in sys.modules


def note(text: str, file: TextIO | None = None) -> None:
    """One status line on stderr (or `file`), written above an open terminal bar rather than through it."""
    f = file if file is not None else sys.stderr
    text = " ".join(str(text).split())
    if is_tty(f):
        tqdm.write(text, file=f)
    else:
        print(text, file=f, flush=True)


def quiet_third_party_bars(file: TextIO | None = None) -> None:
    """When stderr (or `file`) is a log, turn off the bars transformers (loading weights), huggingface_hub
    (downloads) and datasets (building, mapping) draw with tqdm of their own: in a log each is one line of
    carriage returns. Their switches are environment variables, read at import, so this runs before they
    load (and tells them directly when they are loaded already). A terminal keeps them."""
    if is_tty(file):
        return
    for var in THIRD_PARTY_BARS:
        os.environ.setdefault(var, "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].lower() not in ("1", "true", "yes", "on"):
        return  # the user asked for them
    for module, func in (("huggingface_hub.utils", "disable_progress_bars"),
                         ("transformers.utils.logging", "disable_progress_bar"),
                         ("datasets.utils.tqdm", "disable_progress_bars")):
        if module in sys.modules:
            getattr(sys.modules[module], func, lambda: None)()


def close_open_bars() -> None:
    """Close every bar `progress_bar` made that is still open (see the module docstring)."""
    for bar in list(_MADE):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    _MADE.clear()


def overall(items: Iterable, desc: str, *, unit: str = "item", label=str, **kwargs) -> Iterator:
    """Iterate `items` under one bar with N-of-M and ETA, naming the current item (`label(item)`).

    On a TTY this is the top bar (position 0; per-item bars use `position=1, leave=False`); in a
    log it writes a line when an item starts after `every` seconds of silence and when all end."""
    items = list(items)
    bar = progress_bar(total=len(items), desc=desc, unit=unit, position=0, **kwargs)
    try:
        for i, item in enumerate(items):
            bar.set_postfix_str(f"now {label(item)}")  # a line written now names the item under way
            if i:
                bar.update(1)  # the previous item is done
            yield item
        if items:
            bar.set_postfix_str("")
            bar.update(1)
    finally:
        bar.close()


@contextmanager
def transformers_bars_off():
    """transformers' own bars ("Loading weights", "Writing model shards") off for the call: the API prints
    nothing, and a command's log gets its own lines only."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
