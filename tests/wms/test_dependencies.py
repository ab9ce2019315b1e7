"""Dependencies go one way (DESIGN.md section 2): ``tasks`` -> ``jobs`` -> ``files``,
``pilots`` -> ``jobs``, every app -> ``wms``.

A static check with ``ast``: every ``import`` / ``from ... import`` of a project module,
wherever it is written (at the top, inside a function, under ``TYPE_CHECKING``: a lazy import
is still an import), gives an edge from the importing app to the imported one. A forbidden
edge fails with the files and lines that make it.

To forbid more, add a pair to ``FORBIDDEN``; the other checks can reuse :func:`import_edges`.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("wms", "tasks", "jobs", "files", "pilots", "config")

# (importer, imported): apps, or "pilots.agent" for the Django-free agent.
FORBIDDEN = [
    ("files", "tasks"),
    ("files", "jobs"),
    ("files", "pilots"),
    ("tasks", "pilots"),
]


def app_of(module: str) -> str:
    if module == "pilots.agent" or module.startswith("pilots.agent."):
        return "pilots.agent"
    return module.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in ``source``, relative ones made absolute."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from files import services`` imports files.services
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


def import_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importer app, imported app) -> ["path:line", ...], over the project's packages
    (migrations left out: Django writes them)."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            module = module_name(path, root)
            source = path.read_text()
            for line, target in imported_modules(
                source, module, is_package=path.name == "__init__.py"
            ):
                if target.split(".")[0] not in PACKAGES:
                    continue
                a, b = app_of(module), app_of(target)
                if a != b:
                    where = f"{path.relative_to(root)}:{line}"
                    if where not in edges[(a, b)]:
                        edges[(a, b)].append(where)
    return edges


@pytest.fixture(scope="module")
def edges():
    return import_edges()


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_no_forbidden_import(edges, importer, imported):
    assert not edges.get((importer, imported)), (
        f"{importer} must not import {imported}: {edges[(importer, imported)]}"
    )


# --- the check itself, on planted sources -------------------------------------------------------


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_an_import_inside_a_function_counts(tmp_path):
    root = plant(
        tmp_path,
        {"files/services.py": "def kick():\n    from tasks.models import TaskInput\n"},
    )
    assert import_edges(root)[("files", "tasks")] == ["files/services.py:2"]


def test_relative_and_package_imports_count(tmp_path):
    root = plant(
        tmp_path,
        {
            "files/api/views.py": "from ...jobs import services\n",
            "tasks/services.py": "import pilots.models\n",
        },
    )
    found = import_edges(root)
    assert found[("files", "jobs")] == ["files/api/views.py:1"]
    assert found[("tasks", "pilots")] == ["tasks/services.py:1"]


def test_allowed_directions_and_other_libraries_are_no_edge_to_worry_about(tmp_path):
    root = plant(
        tmp_path,
        {
            "tasks/services.py": "from jobs.models import Job\nimport django\n",
            "pilots/agent/agent.py": "from wms import contract\n",
        },
    )
    found = import_edges(root)
    assert set(found) == {("tasks", "jobs"), ("pilots.agent", "wms")}
    assert not any(found.get(pair) for pair in FORBIDDEN)
