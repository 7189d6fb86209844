"""The house's floors (README "Layout"): each folder one role, no import runs back up a floor,
no two modules import each other, ``activities/`` holds activity classes only, and no workflow
file grows past what a reader can hold. A change that breaks the shape fails here, by name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# floor of each top-level package: a module may import its own floor and the ones below
FLOORS = {"xpando": 1, "activities": 2, "workflows": 3, "workers": 4, "api": 5, "cli": 6}
PACKAGES = [*FLOORS, "bench", "tests"]
WORKFLOW_MAX_LINES = 500


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``), wherever the import stands (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] in FLOORS
        for target in targets
        if target.split(".")[0] in FLOORS
        and FLOORS[target.split(".")[0]] > FLOORS[module.split(".")[0]]
    ]
    assert upward == []


def test_benchmarks_do_not_import_tests() -> None:
    assert [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == "bench"
        for target in targets
        if target.split(".")[0] == "tests"
    ] == []


def test_no_two_modules_import_each_other() -> None:
    """No cycle of any length among the project's modules (a package importing its own
    submodules, as ``xpando.chain`` does to re-export them, is not a cycle)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_activities_hold_activity_classes_only() -> None:
    """Every public top-level name in ``activities/`` is a class with ``@activity.defn``
    methods; the logic they call lives in the kernel (``xpando/``)."""
    others: list[str] = []
    for module, path in MODULES.items():
        if not module.startswith("activities.") or path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                defines = any(
                    isinstance(item, ast.AsyncFunctionDef | ast.FunctionDef)
                    and any("activity.defn" in ast.unparse(d) for d in item.decorator_list)
                    for item in node.body
                )
                if not defines and not node.name.startswith("_"):
                    others.append(f"{module}.{node.name}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name[0] != "_":
                others.append(f"{module}.{node.name}()")
    assert others == []


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.py")), ids=lambda p: p.name)
def test_workflow_files_stay_readable(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= WORKFLOW_MAX_LINES


def test_no_workflow_is_patched() -> None:
    """Before the first release there are no histories to protect: a change ships as a new
    Worker Deployment version, not as a ``workflow.patched`` branch."""
    patched = [
        path.name
        for path in sorted((ROOT / "workflows").glob("*.py"))
        if "workflow.patched(" in path.read_text()
    ]
    assert patched == []
