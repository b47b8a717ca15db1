"""The import graph: spectra/ is acyclic (function-level imports included; `if TYPE_CHECKING:` blocks
are not imports) and the library never imports the recipes (pretrain/) or the report builders
(reports/). A command is registered by module name in spectra/cli/__init__.py, not imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
SPECTRA = Path(__file__).resolve().parents[1] / "spectra"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # typing-only imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "spectra":
                out.update(f"spectra.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = {p.stem for p in SPECTRA.glob("*.py") if p.stem != "__init__"}
    g = {}
    for m in mods:
        deps = _imports(SPECTRA / f"{m}.py")
        g[m] = {d.split(".")[1] for d in deps if d.startswith("spectra.") and d.split(".")[1] in mods} - {m}
        g[f"!{m}"] = {d for d in deps if d.split(".")[0] in ("pretrain", "reports")}
    return g


def test_no_cycles():
    g = {k: v for k, v in graph().items() if not k.startswith("!")}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, path):
        state[n] = 1
        for d in sorted(g[n]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_library_imports_no_recipe():
    bad = {k[1:]: v for k, v in graph().items() if k.startswith("!") and v}
    assert not bad, bad


def test_the_checker_sees_function_level_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import spectra.a\n"
                 "def f():\n    from spectra import b\n    import pretrain.loop\n")
    assert _imports(p) == {"typing", "spectra", "spectra.b", "pretrain.loop"}
