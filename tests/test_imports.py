"""The import graph: each layer of vlmask imports only from the layers below it, and nothing cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interventions", "vlmask")
ACYCLIC = ("interventions", "vlmask")

LAYERS = (
    ("interventions",),
    ("vlmask.errors", "vlmask.builtin"),
    ("vlmask.model",),
    ("vlmask.inputs",),
    ("vlmask.results",),
    ("vlmask.spec",),
    ("vlmask.engine",),
    ("vlmask.viz",),
    ("vlmask.batch",),
    ("vlmask.cli",),
    ("vlmask",),  # the package's own __init__: the public surface
)
"""Lowest first: a module may import modules of its own layer or of a lower one."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in it (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (only names that are modules)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _layer(module: str) -> int:
    best = max(
        (prefix for layer in LAYERS for prefix in layer if module == prefix or module.startswith(prefix + ".")), key=len
    )
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_each_layer_imports_only_from_layers_below_it():
    wrong = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {
        m: {t for t in ts if t.split(".")[0] in ACYCLIC} for m, ts in graph().items() if m.split(".")[0] in ACYCLIC
    }
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its own modules is not a cycle of logic: leave those out
    real = [c for c in cycles if not any(c.startswith(p + " -> " + p + ".") for p in edges)]
    assert not real, "\n".join(real)


def test_interventions_import_without_vlmask():
    code = "import sys, interventions; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vlmask'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["vlmask.viz.report", "vlmask.viz.compare", "vlmask.results.io", "xarray"])
def test_any_module_imported_first_in_a_fresh_process_works(module):
    """Importing xarray registers the accessor, which must not re-enter a module that is importing xarray."""
    code = f"import {module}; import vlmask, xarray; assert hasattr(xarray.Dataset, 'vlmask')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
