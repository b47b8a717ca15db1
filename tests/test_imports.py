"""The import graph of spectra/, module by module (dotted names, subpackages included), read from the source:

- no import cycle, `if TYPE_CHECKING:` imports counted (a typing-only cycle is still two modules that need each
  other to be understood);
- the library (spectra/ minus spectra/cli/ and spectra/__init__.py) never imports spectra.cli, the recipes
  (pretrain/) or the report builders (reports/);
- the library imports at module level: no import of a spectra module inside a function, and no function-level
  import of anything but the optional packages that may be absent.
A command is registered by module name in spectra/cli/__init__.py, not imported, so the CLI stays light."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("pretrain", "reports")
# may be missing (extras, dev tools): imported where used, with an ImportError turned into one line
OPTIONAL = {"peft", "galore_torch", "weightwatcher", "pyhessian", "tensorboard", "wandb", "powerlaw", "lm_eval",
            "yaml", "torch.utils.tensorboard"}


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name
    line: int
    in_function: bool
    typing_only: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict[str, Path]:
    """Every module under `package`, by dotted name."""
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> list[Import]:
    """What `path` (module `name`) imports, as dotted module names: `from a.b import c` is a.b.c when that is a
    module in `known`, else a.b; relative imports are resolved against the module's package."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node, in_function: bool, typing_only: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, typing_only)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, in_function, typing_only) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append(Import(sub if sub in known else base, node.lineno, in_function, typing_only))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function, typing_only)

    visit(tree, False, False)
    return found


def graph(package: Path = ROOT / "spectra") -> tuple[dict[str, Path], dict[str, list[Import]]]:
    mods = modules(package)
    return mods, {m: imports(p, m, set(mods)) for m, p in mods.items()}


def is_library(name: str) -> bool:
    return name.startswith("spectra.") and not (name == "spectra.cli" or name.startswith("spectra.cli."))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _internal_edges(mods, found) -> dict[str, set[str]]:
    return {m: {i.target for i in imps if i.target in mods and i.target != m} for m, imps in found.items()}


def test_no_cycles_typing_imports_included():
    mods, found = graph()
    assert len(mods) > 30 and "spectra.io.runs" in mods  # the walk sees the subpackages
    assert not cycles(_internal_edges(mods, found)), cycles(_internal_edges(mods, found))


def test_library_imports_no_cli_and_no_recipe():
    mods, found = graph()
    bad = {m: sorted({i.target for i in imps if i.target.split(".")[0] in RECIPES
                      or i.target == "spectra.cli" or i.target.startswith("spectra.cli.")})
           for m, imps in found.items() if is_library(m)}
    assert not {m: v for m, v in bad.items() if v}, {m: v for m, v in bad.items() if v}


def test_library_imports_spectra_modules_at_module_level():
    mods, found = graph()
    bad = {m: sorted({f"{i.target}:{i.line}" for i in imps if i.in_function and i.target.split(".")[0] == "spectra"})
           for m, imps in found.items() if is_library(m)}
    assert not {m: v for m, v in bad.items() if v}, {m: v for m, v in bad.items() if v}


def test_library_imports_only_optional_packages_in_functions():
    mods, found = graph()
    bad = {m: sorted({f"{i.target}:{i.line}" for i in imps if i.in_function and i.target.split(".")[0] != "spectra"
                      and i.target not in OPTIONAL and i.target.split(".")[0] not in OPTIONAL})
           for m, imps in found.items() if is_library(m)}
    assert not {m: v for m, v in bad.items() if v}, {m: v for m, v in bad.items() if v}


def test_the_checker_sees_typing_function_and_relative_imports(tmp_path):
    pkg = tmp_path / "spectra"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                                     "def f():\n    from spectra import data\n    import pretrain.loop\n")
    (pkg / "io" / "b.py").write_text("from spectra.io import a\nfrom ..data import y\n")
    (pkg / "data.py").write_text("import numpy\n")
    mods, found = graph(pkg)
    assert set(mods) == {"spectra", "spectra.io", "spectra.io.a", "spectra.io.b", "spectra.data"}
    got = {(i.target, i.in_function, i.typing_only) for i in found["spectra.io.a"]}
    assert got == {("typing", False, False), ("spectra.io.b", False, True), ("spectra.data", True, False),
                   ("pretrain.loop", True, False)}
    assert [i.target for i in found["spectra.io.b"]] == ["spectra.io.a", "spectra.data"]
    assert cycles(_internal_edges(mods, found)) == [["spectra.io.a", "spectra.io.b"]]  # through TYPE_CHECKING
