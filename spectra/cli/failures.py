"""How a failure reaches the user: one `error: ...` line that names the file or flag and the way out, and an
exit code (2: the input or a path given is wrong; 1: the machine ran out of something; 130/143: Ctrl-C/SIGTERM).

A SpectraError already is such a line. An OSError from anywhere (a full or read-only disk, a path under a
regular file, a symlink loop, a folder where a file belongs) is said by its errno with the path it names, or,
when the system gave none (a write that found the disk full), with the output flags of the command line.
Only an exception nothing here knows keeps its type in the line: that is a bug to report, and
SPECTRA_DEBUG=1 shows its traceback.
"""

from __future__ import annotations

import errno
import os

OUTPUT_FLAGS = ("--out", "--runs-dir")  # where commands write; named when an OSError carries no path

# errno -> (what happened, with {path}; the way out; exit code)
_OS_ERRORS: dict[int, tuple[str, str, int]] = {
    errno.ENOSPC: ("no space left on the device{at}", "free space there or write elsewhere{flags}", 1),
    errno.EDQUOT: ("disk quota exceeded{at}", "free space there or write elsewhere{flags}", 1),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable location{flags}", 2),
    errno.EACCES: ("permission denied: {path}", "choose a path you may use, or change its permissions", 2),
    errno.EPERM: ("operation not permitted on {path}", "choose a path you may use, or change its permissions", 2),
    errno.ENOTDIR: ("{path}: a part of this path is a file, not a folder", "choose another path", 2),
    errno.ELOOP: ("{path}: its symbolic links form a loop", "remove the loop or choose another path", 2),
    errno.EEXIST: ("{path} already exists", "remove it or choose another path", 2),
    errno.EISDIR: ("{path} is a folder where a file is expected", "give the path of a file", 2),
    errno.ENOTEMPTY: ("{path} is a folder that is not empty", "remove it or choose another path", 2),
    errno.ENOENT: ("{path} does not exist", "check the path", 2),
    errno.ENAMETOOLONG: ("{path}: the name is too long", "choose a shorter path", 2),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again", 1),
    errno.ENFILE: ("too many open files on this system", "close other programs or raise the limit", 1),
    errno.EIO: ("input/output error{at}", "the disk or the file is damaged: check it or use another copy", 1),
    errno.ENOMEM: ("out of memory", "use smaller batches or a machine with more memory", 1),
    errno.ENXIO: ("{path} is a device that cannot be opened this way", "give a regular file or folder", 2),
    errno.ETXTBSY: ("{path} is busy", "wait for the program using it, or choose another path", 2),
    errno.EBUSY: ("{path} is busy", "wait for the program using it, or choose another path", 2),
}


def flag_values(argv: list[str] | None, flags=OUTPUT_FLAGS) -> list[str]:
    """`--out X` / `--out=X` as they appear in argv, for each of `flags`."""
    argv = list(argv or [])
    out = []
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                out.append(f"{f} {argv[i + 1]}")
            elif a.startswith(f + "="):
                out.append(f"{f} {a[len(f) + 1:]}")
    return out


def os_error_line(e: OSError, argv: list[str] | None = None) -> tuple[str, int]:
    """(message, exit code) for an OSError, naming its path (or the command's outputs) and what to do."""
    path = e.filename if isinstance(e.filename, (str, bytes)) else None
    if path is not None and isinstance(e.filename2, (str, bytes)):
        path = f"{path!s} -> {e.filename2!s}"
    outputs = flag_values(argv)
    if e.errno in (errno.EEXIST, errno.ENOENT, errno.ELOOP) and isinstance(e.filename, str) \
            and os.path.islink(e.filename) and not os.path.exists(e.filename):
        return (f"{e.filename} is a symbolic link that leads nowhere (a loop, or a missing target); remove it or "
                "choose another path", 2)
    what, way, code = _OS_ERRORS.get(e.errno, ("{path}: " + (e.strerror or str(e)), "check the path", 2))
    subject = path or (f"the output ({', '.join(outputs)})" if outputs else "a file")
    at = f" writing {path}" if path else (f" (writing {', '.join(outputs)})" if outputs else "")
    flags = f" ({'/'.join(f.split()[0] for f in outputs) or '--out'})"
    return f"{what.format(path=subject, at=at)}; {way.format(flags=flags)}", code


def explain(e: BaseException, argv: list[str] | None = None) -> tuple[str, int] | None:
    """(message, exit code) for the failures users cause or meet; None for a bug (the caller shows its type)."""
    kinds = {c.__name__ for c in type(e).__mro__}
    if isinstance(e, OSError) and e.errno is not None:
        return os_error_line(e, argv)
    if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop"):  # pathlib.resolve (Python < 3.13)
        return f"{e}: its symbolic links form a loop; remove the loop or choose another path", 2
    if "OutOfMemoryError" in kinds:  # torch.cuda.OutOfMemoryError (matched by name: no torch import here)
        return "out of GPU memory; use smaller batches (--micro-batch, --batch-size) or --device cpu", 1
    if isinstance(e, MemoryError):
        return "out of memory; use smaller batches or fewer sequences, or a machine with more memory", 1
    if isinstance(e, ImportError) and e.name:
        return f"{e}: a package this command needs is missing; install it (pip install {e.name.split('.')[0]})", 1
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); give text files in UTF-8", 2
    return None


def interrupted_line(argv: list[str] | None, how: str) -> str:
    """The one line for Ctrl-C / SIGTERM; a pretraining run says how to continue it."""
    command = next((a for a in argv or [] if not a.startswith("-")), "")
    hint = "; rerun it with --resume (and its --run-id) to continue from the latest checkpoint" \
        if command == "pretrain" else ""
    return f"interrupted ({how}){hint}"
