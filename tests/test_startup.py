"""Start-up (issue "spectra as a library"): `spectra --help`, `spectra CMD --help` and a bad flag load neither torch
nor transformers, which is what made them take seconds. Asserted on sys.modules, not on a clock, so a busy
machine cannot make it flaky; the times are printed for the record (bench: median of 5 in the report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spectra.cli import COMMANDS

pytestmark = pytest.mark.slow  # fresh interpreters
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets")

# each argv runs in turn in one fresh interpreter; after each, which heavy modules are loaded and the exit code
PROBE = """
import json, sys, time
from spectra.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    t = time.perf_counter()
    code = main(argv)
    out.append({"argv": argv, "code": code, "s": time.perf_counter() - t,
                "heavy": [m for m in %r if m in sys.modules]})
print(json.dumps(out))
""" % (HEAVY,)


def probe(*argvs: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_top_level_help_loads_no_torch():
    (top,) = probe(["--help"])
    assert top["code"] == 0 and top["heavy"] == [], top


@pytest.mark.parametrize("name", [n for n, *_ in COMMANDS])
def test_command_help_and_a_bad_flag_load_no_torch(name):
    """`spectra NAME --help` then `spectra NAME --no-such-flag`: the command's module is imported (click needs its
    options) but the library behind it is not; the bad flag is a usage error (exit 2), found before any work."""
    helped, bad = probe([name, "--help"], [name, "--no-such-flag"])
    assert helped["code"] == 0 and helped["heavy"] == [], helped
    assert bad["code"] == 2 and bad["heavy"] == [], bad
    print(f"{name}: --help {helped['s']:.2f} s, bad flag {bad['s']:.2f} s (in-process, after interpreter start)")


def test_the_probe_sees_a_heavy_import():
    """A command whose module imports torch is caught (the check above can fail)."""
    code = PROBE.replace("out = []", "import torch\nout = []")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([["--help"]])], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1])[0]["heavy"][:1] == ["torch"]
