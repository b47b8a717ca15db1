"""spectra.progress: plain N-of-M/ETA lines (no carriage returns) when stderr is not a TTY, tqdm on one."""

from __future__ import annotations

import io

import pytest

from spectra.progress import LineBar, _hms, overall, progress_bar

pytestmark = pytest.mark.unit


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True



@pytest.fixture(autouse=True)
def bars_on():
    """These tests are about the bars themselves: on, as a command turns them on (the API default is off)."""
    from spectra import progress

    was = progress.shown()
    progress.show(True)
    yield
    progress.show(was)


def test_log_lines_every_n_seconds_with_n_of_m_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = progress_bar(total=150, desc="pretrain 9m", every=10, file=out, clock=clock)
    assert isinstance(bar, LineBar)
    for step in range(1, 151):
        clock.t += 0.5  # 2 steps/s: 75 s in all
        bar.update(1)
        bar.set_postfix(loss=3.0 - step / 100, lr=3e-3)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # one at the start, one per 10 s of the 75 s (at 10, 20, ..., 70 s), one at the end
    assert len(lines) == 1 + 7 + 1
    assert lines[0] == "pretrain 9m: 0/150 (0%), elapsed 0:00:00"
    assert lines[1].startswith("pretrain 9m: 20/150 (13%), 2 it/s, elapsed 0:00:10, ETA 0:01:05, loss=2.8")
    assert lines[-1] == "pretrain 9m: 150/150 (100%), 2 it/s, elapsed 0:01:15, done, loss=1.5 lr=0.003"
    assert all(len(line) < 200 for line in lines)


def test_eta_follows_the_measured_rate_from_a_resumed_step():
    out, clock = io.StringIO(), Clock()
    bar = LineBar(total=100, initial=40, desc="x", every=0, file=out, clock=clock)
    clock.t += 30.0
    bar.update(10)  # 10 steps in 30 s since the resume: 3 s/step, 50 to go
    assert out.getvalue().splitlines()[-1] == "x: 50/100 (50%), 3 s/it, elapsed 0:00:30, ETA 0:02:30"
    bar.close()
    assert out.getvalue().splitlines()[-1].endswith("stopped")  # closed before the total


def test_iterating_and_disable():
    out, clock = io.StringIO(), Clock()
    assert list(progress_bar(range(3), desc="svd", file=out, clock=clock, every=1e9)) == [0, 1, 2]
    assert out.getvalue().splitlines() == ["svd: 0/3 (0%), elapsed 0:00:00", "svd: 3/3 (100%), elapsed 0:00:00, done"]
    quiet = io.StringIO()
    with progress_bar(total=5, file=quiet, disable=True, clock=clock) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_overall_names_the_item_under_way_with_eta():
    out, clock = io.StringIO(), Clock()
    done = []
    for comp in overall(["L0.q", "L0.k", "L0.v", "L0.o"], "hessian-gap", unit="component", file=out, clock=clock,
                        every=0):
        clock.t += 60.0  # a minute per component
        done.append(comp)
    assert done == ["L0.q", "L0.k", "L0.v", "L0.o"]
    lines = out.getvalue().splitlines()
    assert lines[0] == "hessian-gap: 0/4 (0%), elapsed 0:00:00"
    assert lines[1] == "hessian-gap: 1/4 (25%), 60 s/component, elapsed 0:01:00, ETA 0:03:00, now L0.k"
    assert lines[3] == "hessian-gap: 3/4 (75%), 60 s/component, elapsed 0:03:00, ETA 0:01:00, now L0.o"
    assert lines[-1] == "hessian-gap: 4/4 (100%), 60 s/component, elapsed 0:04:00, done"


def test_tty_gets_tqdm():
    from tqdm import tqdm

    tty = TTY()
    with progress_bar(total=3, desc="compress", file=tty) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
    assert isinstance(progress_bar(total=1, file=io.StringIO(), tty=True, disable=True), tqdm)


def test_every_from_environment(monkeypatch):
    monkeypatch.setenv("SPECTRA_PROGRESS_EVERY", "5")
    assert LineBar(total=1, file=io.StringIO()).every == 5.0
    monkeypatch.setenv("SPECTRA_PROGRESS_EVERY", "soon")
    assert LineBar(total=1, file=io.StringIO()).every == 30.0
    assert _hms(3725.4) == "1:02:05" and _hms(-1) == "0:00:00"


def test_close_open_bars_closes_what_an_error_left_open():
    """A command whose loop raises leaves its bar open (the traceback keeps the command's frame, and so the
    bar, alive); close_open_bars ends both kinds, a log bar with its "stopped" line, before the CLI
    writes its error line."""
    from spectra.progress import close_open_bars

    def command(file, **kw):
        bar = progress_bar(total=5, desc="svd", file=file, **kw)
        for i in range(5):
            if i == 2:
                raise ValueError("bad weight")
            bar.update(1)

    log, tty, clock = io.StringIO(), TTY(), Clock()
    held = []
    for file, kw in ((log, {"clock": clock, "every": 1e9}), (tty, {})):
        try:
            command(file, **kw)
        except ValueError as e:
            held.append(e)  # as the CLI's except clause does
    assert log.getvalue().splitlines() == ["svd: 0/5 (0%), elapsed 0:00:00"]
    drawn = tty.getvalue()
    assert not drawn.endswith("\n")
    close_open_bars()
    assert log.getvalue().splitlines()[-1] == "svd: 2/5 (40%), elapsed 0:00:00, stopped"
    assert tty.getvalue().startswith(drawn) and tty.getvalue().endswith("\n")  # tqdm's close ends its line
    n = (len(log.getvalue()), len(tty.getvalue()))
    close_open_bars()  # nothing left open: nothing more written
    assert (len(log.getvalue()), len(tty.getvalue())) == n


def test_a_log_line_is_one_line_of_at_most_200_characters():
    out, clock = io.StringIO(), Clock()
    bar = LineBar(total=10, desc="sweep " + "x" * 300, every=0, file=out, clock=clock)
    bar.set_postfix_str("now a\rb\nc")
    clock.t += 1
    bar.update(1)
    lines = out.getvalue().splitlines()
    assert [len(line) for line in lines] == [200, 200] and lines[0].endswith("x...")
    short = LineBar(total=2, desc="d", every=0, file=io.StringIO(), clock=clock)
    short.set_postfix_str("now a\rb\nc")
    assert short.line().endswith("now a\rb\nc")  # line() is the raw text; what is written is folded:
    short.update(1)
    assert short.file.getvalue().splitlines()[-1].endswith(", now a b c")


def test_note_is_a_plain_line_in_a_log_and_goes_above_a_terminal_bar():
    from spectra.progress import note

    log = io.StringIO()
    note("runs/x: overwriting\n(old content)", file=log)
    assert log.getvalue() == "runs/x: overwriting (old content)\n"
    tty = TTY()
    with progress_bar(total=3, desc="compress", file=tty) as bar:
        bar.update(1)
        note("starting over", file=tty)
    before, after = tty.getvalue().split("starting over\n")
    assert "compress" in before and "compress" in after  # the bar is cleared, the note written, the bar redrawn


def test_library_bars_off_only_in_a_log(monkeypatch):
    import os

    from spectra.progress import THIRD_PARTY_BARS, quiet_third_party_bars

    for var in THIRD_PARTY_BARS:
        monkeypatch.delenv(var, raising=False)
    quiet_third_party_bars(TTY())
    assert not any(v in os.environ for v in THIRD_PARTY_BARS)  # a terminal keeps them
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's word wins
    quiet_third_party_bars(io.StringIO())
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0" and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
