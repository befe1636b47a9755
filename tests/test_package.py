"""The package's structure: which module may import which (the floors of STYLE.md), and the dependencies it
declares against the APIs it calls."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import vitlab

SRC = Path(vitlab.__file__).parent
ROOT = Path(__file__).resolve().parents[1]  # the repository: pyproject.toml


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def _nodes(tree: ast.AST, *, module_level: bool) -> list[ast.AST]:
    """The import statements of a file: all of them, or only those that run when the module is imported (not in
    a function body, not under ``if TYPE_CHECKING``)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if module_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports(module: str, *, module_level: bool = False) -> set[str]:
    """The vitlab modules that ``module`` imports (a function's import is a dependency too, only a later one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text()), module_level=module_level):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:  # relative: from .x import y
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([node.module] if node.module else []))
        out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in out if m in MODULES}


def cycle_through(start: str) -> list[str] | None:
    """An import path from ``start`` back to itself, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(imports(node)):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


LOADERS = {"vitlab.checkpoint", "vitlab.factory"}
# the registry at the bottom, the model families above it, the loaders and create_model above both
FLOORS = ["vitlab._registry", *sorted(m for m in MODULES if m.startswith("vitlab.models")), *sorted(LOADERS)]


def test_the_registry_knows_no_model_and_no_loader() -> None:
    """The ground floor: the families register into it; it imports none of them, and no checkpoint loader."""
    found = imports("vitlab._registry")
    assert not {m for m in found if m.startswith("vitlab.models") or m in LOADERS}, found


def test_the_checkpoint_loaders_import_no_model_module() -> None:
    """`vitlab.checkpoint` dispatches through the registry's converter tables; it never names a family."""
    assert not {m for m in imports("vitlab.checkpoint") if m.startswith("vitlab.models")}
    assert not {m for m in imports("vitlab.checkpoint", module_level=True) if m.startswith("vitlab.models")}


@pytest.mark.parametrize("module", FLOORS)
def test_no_import_cycle_through_the_registry_the_loaders_or_the_models(module: str) -> None:
    assert cycle_through(module) is None, " -> ".join(cycle_through(module) or [])


def test_torch_floor_covers_the_torch_apis_the_package_calls() -> None:
    """pyproject's lower bound on torch is at least the release that added each API the source calls."""
    needs = {  # a call pattern -> the torch release that introduced it
        r"torch\.get_autocast_dtype\(": (2, 4),
        r"torch\.is_autocast_enabled\(\s*[^)\s]": (2, 4),  # with a device type argument
    }
    text = "\n".join(p.read_text() for p in MODULES.values())
    need = max((v for pattern, v in needs.items() if re.search(pattern, text)), default=(0, 0))
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', pyproject)
    assert floor, "pyproject.toml declares no lower bound on torch"
    assert (int(floor[1]), int(floor[2])) >= need, f"torch>={floor[1]}.{floor[2]} but the source needs {need}"
