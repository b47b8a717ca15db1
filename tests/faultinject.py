"""Fault injector for `spectra pretrain`: SIGKILL a real process at every file-write event of a run.

Test-side only: the hooks wrap Python's file-writing functions (open for writing, os.replace,
os.rename, unlink, rmtree, mkdir, symlink, safetensors' save_file) in the child process; production
code knows nothing of them. An event is one such call on a path inside the runs folder; the child
kills itself with SIGKILL *before* event k runs, which leaves the disk exactly as a kill -9 at that
moment would. Writes to temporary names (zarr's `*.partial`, spectra's `.*.tmp`, a checkpoint's
`.tmp_step_N/`), creating a folder (an empty folder is never read as data) and zarr's exclusive
create of a file that exists (it fails), and replacing a file by identical bytes are not events:
nothing visible changes there, so a kill before them equals a kill before the next event (whose state
includes the leftover).

A fork server keeps it affordable: this process imports torch and spectra once, runs nothing,
and forks one child per trial (a fresh fork has no threads, so it is safe). Each trial:
  1. a child runs the command and SIGKILLs itself at event k;
  2. the trial process checks the store (opens; its steps are a prefix of the reference's; every
     visible array equals the reference bit for bit), then runs `--resume` to the end;
  3. the final weights, metrics and snapshots must equal the uninterrupted reference bit for bit.
`--during-resume` repeats this with the kill placed at every event of a `--resume` that starts
from a killed state.

    python tests/faultinject.py --work DIR --workers 2 -- pretrain --model tiny ...   # prints JSON
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TIMING = ("tokens_per_s", "elapsed_s")


# --------------------------------------------------------------------------- hooks (child only)
def _temporary(path: str) -> bool:
    """Temporary names (zarr's *.partial, spectra's .*.tmp, a checkpoint's .tmp_step_N folder)."""
    parts = path.split(os.sep)
    return any(".partial" in q or q.endswith(".tmp") or q.startswith(".tmp") for q in parts)


def install(root: str, fault_at: int | None, log: list | None, sig: int = signal.SIGKILL) -> None:
    import safetensors.torch

    lock = threading.Lock()
    count = [0]

    def event(kind: str, path) -> None:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return
        if not p.startswith(root) or _temporary(p) or kind == "mkdir" or (kind == "link" and os.path.exists(p)):
            return  # invisible until renamed, an empty folder, or a no-op: a kill there equals one at the next event
        with lock:
            n = count[0]
            count[0] += 1
            if log is not None:
                log.append(f"{kind} {os.path.relpath(p, root)}")
            if n == fault_at or (callable(fault_at) and fault_at(f"{kind} {os.path.relpath(p, root)}")):
                os.kill(os.getpid(), sig)

    def wrap(mod, name, kind, pick=lambda a, k: a[0] if a else None, when=lambda a, k: True):
        orig = getattr(mod, name)

        def hooked(*a, **k):
            if when(a, k):
                event(kind, pick(a, k))
            return orig(*a, **k)

        setattr(mod, name, hooked)
        return hooked

    def writing(a, k):
        mode = a[1] if len(a) > 1 else k.get("mode", "r")
        return isinstance(a[0] if a else None, (str, os.PathLike)) and any(c in mode for c in "wax+")

    def changes(a, k):  # replacing a file by identical bytes (zarr rewrites group metadata) changes nothing
        src, dst = (os.fspath(x) for x in a[:2])
        try:
            if os.path.isfile(dst) and os.path.getsize(src) == os.path.getsize(dst) and os.path.getsize(dst) < 1 << 20:
                with io.FileIO(src) as f1, io.FileIO(dst) as f2:
                    return f1.read() != f2.read()
        except OSError:
            pass
        return True

    opened = wrap(builtins, "open", "write", when=writing)
    io.open = opened
    wrap(os, "replace", "replace", pick=lambda a, k: a[1], when=changes)
    wrap(os, "rename", "rename", pick=lambda a, k: a[1], when=changes)
    wrap(os, "unlink", "unlink")
    wrap(os, "remove", "unlink")
    wrap(os, "rmdir", "rmdir")
    wrap(os, "mkdir", "mkdir")
    wrap(os, "symlink", "symlink", pick=lambda a, k: a[1])
    wrap(os, "link", "link", pick=lambda a, k: a[1])
    wrap(shutil, "rmtree", "rmtree")
    wrap(safetensors.torch, "save_file", "safetensors", pick=lambda a, k: a[1] if len(a) > 1 else k.get("filename"))
    wrap(
        os,
        "open",
        "os.open",
        when=lambda a, k: bool((a[1] if len(a) > 1 else k.get("flags", 0)) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)),
    )


# --------------------------------------------------------------------------- running
def run_cli(
    argv: list[str], runs: Path, fault_at: int | None = None, log_file: Path | None = None, sig: int = signal.SIGKILL
) -> int:
    """Fork a child running `spectra <argv> --runs-dir runs`; its exit code (-9: killed)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        # a Ctrl-C (sig SIGINT) must raise KeyboardInterrupt even where this script was started with SIGINT
        # ignored (a shell's background job, nohup ... &; under pytest, conftest already restores it)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            log: list | None = [] if log_file else None
            install(str(runs.resolve()), fault_at, log, sig)
            from spectra.cli import main

            with open(os.devnull, "w") as devnull:
                if fault_at is not None or not log_file:  # quiet trials; the reference run may speak
                    sys.stderr = devnull
                code = main([*argv, "--runs-dir", str(runs)])
            if log_file:
                Path(log_file).write_text("\n".join(log))
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot_of(run: Path) -> dict:
    """Everything compared bit for bit: metrics (minus timings), snapshot steps and arrays, final weights."""
    from safetensors.torch import load_file

    from spectra.io.snapshots import open_run

    rows = [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    ]
    store = open_run(run)
    arrays = {f"{l}.{c}": store.param(l, c).load() for l, c in store.keys()}
    final = max((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return {
        "rows": rows,
        "steps": [int(s) for s in store.steps],
        "arrays": arrays,
        "meta": store.meta,
        "weights": load_file(str(final / "model.safetensors")),
        "final": final.name,
    }


def visible_prefix_ok(run: Path, ref: dict) -> str | None:
    """After a kill: the store (if any) opens, shows a prefix of the reference steps, and equals it."""
    from spectra.errors import SpectraError
    from spectra.io.snapshots import open_run

    if not (run / "snapshots.zarr" / "zarr.json").is_file():
        return None
    try:
        store = open_run(run)
    except SpectraError as e:
        if "no committed snapshots" in str(e):
            return None
        return f"store does not open: {e}"
    steps = [int(s) for s in store.steps]
    if steps != ref["steps"][: len(steps)]:
        return f"visible steps {steps} are not a prefix of {ref['steps']}"
    for key, ds in ref["arrays"].items():
        l, c = key.split(".")
        got = store.param(int(l), c).load()
        for name in ds.data_vars:
            if not (got[name].values == ds[name].values[: len(steps)]).all():
                return f"visible {key}/{name} differs from the reference"
    return None


def compare(run: Path, ref: dict) -> str | None:
    got = snapshot_of(run)
    if got["rows"] != ref["rows"]:
        return "metrics differ"
    if got["steps"] != ref["steps"] or got["final"] != ref["final"]:
        return f"steps {got['steps']} / {got['final']} differ from {ref['steps']} / {ref['final']}"
    for key, ds in ref["arrays"].items():
        if not ds.identical(got["arrays"][key].drop_attrs(deep=False).assign_attrs(ds.attrs)):
            return f"snapshot {key} differs"
    for k, t in ref["weights"].items():
        if not (got["weights"][k] == t).all():
            return f"final weight {k} differs"
    return None


def trial(argv: list[str], base: Path, ref_run: Path, k: int, resume_from: Path | None) -> dict:
    """Kill at event k (of the first run, or of a --resume from a copy of `resume_from`), then resume."""
    runs = base / f"t{k}"
    shutil.rmtree(runs, ignore_errors=True)
    first = list(argv)
    if resume_from is not None:
        shutil.copytree(resume_from, runs, symlinks=True)
        first = [*argv, "--resume"]
    code = run_cli(first, runs, fault_at=k)
    out = {"event": k, "killed": code == -9}
    run = runs / RUN_ID
    try:
        ref = snapshot_of(ref_run)
        err = visible_prefix_ok(run, ref) if code == -9 else None
        if err is None:
            rc = run_cli([*argv, "--resume"], runs)
            err = f"--resume exited {rc}" if rc != 0 else compare(run, ref)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
    out["error"] = err
    shutil.rmtree(runs, ignore_errors=True)
    return out


def signal_trial(argv: list[str], base: Path, ref_run: Path, k: int, sig: int) -> dict:
    """Signal the run at event k (a snapshot write in flight on the writer thread), then resume."""
    runs = base / "sig"
    shutil.rmtree(runs, ignore_errors=True)
    code = run_cli(argv, runs, fault_at=k, sig=sig)
    out = {"event": k, "code": code}
    pid = os.fork()  # reading the store starts zarr threads: do it in a child, report through a file
    if pid == 0:
        from spectra.io.snapshots import open_run

        res = {}
        try:
            res["steps_after_signal"] = [int(s) for s in open_run(runs / RUN_ID).steps]
            rc = run_cli([*argv, "--resume"], runs)
            res["error"] = f"--resume exited {rc}" if rc != 0 else compare(runs / RUN_ID, snapshot_of(ref_run))
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
        (base / "sig.json").write_text(json.dumps(res))
        os._exit(0)
    os.waitpid(pid, 0)
    out.update(json.loads((base / "sig.json").read_text()))
    return out


def sweep(argv, base: Path, ref: Path, n_events: int, workers: int, resume_from: Path | None,
          only: list[int] | None = None) -> list[dict]:
    results, running, todo = [], {}, list(range(n_events)) if only is None else list(only)
    while todo or running:
        while todo and len(running) < workers:
            k = todo.pop(0)
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rfd)
                res = trial(argv, base, ref, k, resume_from)
                os.write(wfd, json.dumps(res).encode())
                os._exit(0)
            os.close(wfd)
            running[pid] = (k, rfd)
        pid, _ = os.wait()
        k, rfd = running.pop(pid)
        with os.fdopen(rfd) as f:
            data = f.read()
        results.append(json.loads(data) if data else {"event": k, "killed": False, "error": "trial crashed"})
        with open(base / "results.jsonl", "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    return sorted(results, key=lambda r: r["event"])


RUN_ID = "fi"


def _only(events: list[str], texts: str | None) -> list[int] | None:
    """The indices of the events naming one of the comma-separated `texts` (None: every event)."""
    if texts is None:
        return None
    return [i for i, e in enumerate(events) if any(t in e for t in texts.split(","))]


def warm_imports() -> None:
    """Import (not run) everything a trial needs, once, so forked children start in milliseconds."""
    import datasets  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import pretrain.loop  # noqa: F401
    import spectra.cli  # noqa: F401
    import spectra.data  # noqa: F401
    import spectra.io.analysis_store  # noqa: F401
    import spectra.io.snapshots  # noqa: F401
    import spectra.lm.evaluate  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--resume-kill-at",
        default=None,
        help="also sweep every event of a --resume started from the state killed at this event "
        "(auto: halfway between the first checkpoint and the end)",
    )
    ap.add_argument(
        "--signal",
        choices=["TERM", "INT"],
        default=None,
        help="instead of the sweep: send this signal at the first snapshot write after the first "
        "checkpoint (a snapshot in flight), then check the exit code, the store and --resume",
    )
    ap.add_argument(
        "--kill-on",
        default=None,
        metavar="TEXT",
        help="instead of the sweep: run once, SIGKILL before the --nth event containing TEXT",
    )
    ap.add_argument("--nth", type=int, default=1)
    ap.add_argument("--only", default=None, metavar="TEXT",
                    help="sweep only the events containing one of these comma-separated TEXTs (e.g. checkpoints: every "
                         "step of a publish)")
    ap.add_argument("--in-process", action="store_true",
                    help="with --kill-on: install the hooks in this process and run there (a torchrun worker: "
                         "rank 0 kills itself, torchrun stops the others)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="with --kill-on: where the run goes")
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = [x for x in a.argv if x != "--"] + ["--run-id", RUN_ID]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warm_imports()
    if a.kill_on:
        seen = [0]

        def hit(event: str) -> bool:
            seen[0] += a.kill_on in event
            return a.kill_on in event and seen[0] == a.nth

        argv = [x for x in a.argv if x != "--"]
        if a.in_process:
            install(str(a.runs_dir.resolve()), hit, None)
            from spectra.cli import main as cli_main

            sys.exit(cli_main([*argv, "--runs-dir", str(a.runs_dir)]))
        print(json.dumps({"code": run_cli(argv, a.runs_dir, fault_at=hit)}))
        return

    t0 = time.time()
    base = a.work
    base.mkdir(parents=True, exist_ok=True)
    ref_runs = base / "ref"
    shutil.rmtree(ref_runs, ignore_errors=True)
    log = base / "events.log"
    assert run_cli(argv, ref_runs, log_file=log) == 0, "the uninterrupted reference run failed"
    events = log.read_text().splitlines()
    ref = ref_runs / RUN_ID  # read by each trial child: zarr starts threads, this process must stay forkable
    if a.signal:
        first_ckpt = next(i for i, e in enumerate(events) if e.endswith("checkpoints/latest"))  # published
        k = next(i for i, e in enumerate(events) if i > first_ckpt and "snapshots.zarr/params/" in e)
        print(json.dumps(signal_trial(argv, base, ref, k, getattr(signal, f"SIG{a.signal}"))))
        return
    report = {"events": len(events), "kinds": sorted({e.split()[0] for e in events}), "event_log": events}
    res = sweep(argv, base, ref, len(events), a.workers, None, _only(events, a.only))
    report["training"] = res
    if a.resume_kill_at is not None:
        first_ckpt = next(i for i, e in enumerate(events) if e.endswith("checkpoints/latest"))  # published
        at = (first_ckpt + len(events)) // 2 if a.resume_kill_at == "auto" else int(a.resume_kill_at)
        report["resume_from_event"] = at
        killed = base / "killed"
        shutil.rmtree(killed, ignore_errors=True)
        assert run_cli(argv, killed, fault_at=at) == -9
        rlog = base / "resume-events.log"
        probe = base / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        shutil.copytree(killed, probe, symlinks=True)
        assert run_cli([*argv, "--resume"], probe, log_file=rlog) == 0
        revents = rlog.read_text().splitlines()
        n = len(revents)
        report["resume_events"] = n
        report["resume"] = sweep(argv, base, ref, n, a.workers, killed, _only(revents, a.only))
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
