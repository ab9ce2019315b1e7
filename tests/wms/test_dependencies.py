"""Fitness of the structure (docs/architecture.md, "Dependencies"): dependencies go one way.

- **Apps**: ``tasks`` -> ``jobs`` -> ``files``, ``pilots`` -> ``jobs``, every app -> ``wms``;
  ``wms`` (the shared core) imports no app and not ``config``; ``config`` and ``devtools``
  (``manage.py up``, the demo) may import everything and nothing imports them; the payloads
  import no server code.
- **The pilot agent** (``pilots.agent``) imports only the Django-free pieces of ``wms`` it
  shares with the server (the contract, the topology, checksums, locations), and no server code
  imports the agent.
- **Files**: no circle of imports between modules, whatever their apps.

A static check with ``ast``: every ``import`` / ``from ... import`` of a project module,
wherever it is written (at the top, inside a function, under ``TYPE_CHECKING``: a lazy import
is still an import), is an edge. A failure names the files and lines that make it. The checks
are shown to catch what they are for on planted sources (the end of this file).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "wms",
    "files",
    "jobs",
    "tasks",
    "pilots",
    "config",
    "devtools",
    "payloads",
    "benchmarks",
)
EVERYTHING = frozenset(PACKAGES) | {"pilots.agent"}

# What each app may import besides itself.
ALLOWED: dict[str, frozenset[str]] = {
    "wms": frozenset(),
    "payloads": frozenset(),
    "files": frozenset({"wms"}),
    "jobs": frozenset({"files", "wms"}),
    "tasks": frozenset({"jobs", "files", "wms"}),
    "pilots": frozenset({"jobs", "files", "wms"}),
    "pilots.agent": frozenset({"wms"}),
    "config": EVERYTHING - {"config", "devtools", "benchmarks"},
    "devtools": EVERYTHING - {"devtools", "benchmarks"},
    "benchmarks": EVERYTHING - {"benchmarks"},
}
# The modules of wms the agent may import (Django-free, shared with the server).
AGENT_MAY_IMPORT = frozenset({"wms.contract", "wms.topology", "wms.checksums", "wms.locations"})


def app_of(module: str) -> str:
    if module == "pilots.agent" or module.startswith("pilots.agent."):
        return "pilots.agent"
    return module.split(".")[0]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool) -> list[tuple[int, list[str]]]:
    """Every import in ``source``: (line, candidates), relative names made absolute. An
    ``import x.y`` is ``[x.y]``; a ``from x import y`` is ``[x.y, x]``: the module ``x.y`` if
    there is one, else (``y`` is a name in it) ``x``."""
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.extend((node.lineno, [f"{target}.{alias.name}", target]) for alias in node.names)
    return found


class Graph:
    """The project's modules and their imports (of project modules only)."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}
        for package in PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                if "migrations" not in path.parts:
                    self.paths[module_name(path, root)] = path
        # module -> {imported module -> first line}
        self.imports: dict[str, dict[str, int]] = defaultdict(dict)
        for module, path in self.paths.items():
            for line, candidates in imported_modules(
                path.read_text(), module, is_package=path.name == "__init__.py"
            ):
                exact = [c for c in candidates if c in self.paths]
                resolved = exact[0] if exact else self._resolve(candidates[-1])
                if resolved is not None and resolved != module:
                    self.imports[module].setdefault(resolved, line)

    def _resolve(self, dotted: str) -> str | None:
        """The project module a dotted name is, or lives in (``x.y.Name`` -> ``x.y``)."""
        while dotted and dotted not in self.paths:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def where(self, module: str, target: str) -> str:
        return f"{self.paths[module].relative_to(self.root)}:{self.imports[module][target]}"

    def app_edges(self) -> dict[tuple[str, str], list[str]]:
        """(importer app, imported app) -> ["path:line", ...]."""
        edges: dict[tuple[str, str], list[str]] = defaultdict(list)
        for module, targets in self.imports.items():
            for target in targets:
                a, b = app_of(module), app_of(target)
                if a != b:
                    edges[(a, b)].append(self.where(module, target))
        return edges

    def circles(self) -> list[list[str]]:
        """Every set of modules that import each other in a circle (strongly connected
        components of more than one module, or a module importing itself)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        counter = 0
        for start in sorted(self.paths):
            if start in index:
                continue
            # iterative Tarjan: (node, iterator over its targets)
            work = [(start, iter(sorted(self.imports.get(start, {}))))]
            index[start] = low[start] = counter
            counter += 1
            stack.append(start)
            on_stack.add(start)
            while work:
                node, targets = work[-1]
                advanced = False
                for target in targets:
                    if target not in index:
                        index[target] = low[target] = counter
                        counter += 1
                        stack.append(target)
                        on_stack.add(target)
                        work.append((target, iter(sorted(self.imports.get(target, {})))))
                        advanced = True
                        break
                    if target in on_stack:
                        low[node] = min(low[node], index[target])
                if advanced:
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
        return found


def upward_edges(graph: Graph) -> dict[tuple[str, str], list[str]]:
    return {
        pair: where
        for pair, where in graph.app_edges().items()
        if pair[1] not in ALLOWED.get(pair[0], frozenset())
    }


def agent_imports_outside(graph: Graph) -> list[str]:
    return [
        f"{graph.where(module, target)} imports {target}"
        for module, targets in graph.imports.items()
        if app_of(module) == "pilots.agent"
        for target in targets
        if app_of(target) != "pilots.agent" and target not in AGENT_MAY_IMPORT
    ]


@pytest.fixture(scope="module")
def graph():
    return Graph()


def test_dependencies_between_apps_go_one_way(graph):
    bad = upward_edges(graph)
    assert not bad, "imports against the direction of the layers:\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(where)}" for (a, b), where in sorted(bad.items())
    )


def test_the_core_imports_no_app_and_not_config(graph):
    edges = graph.app_edges()
    assert not [pair for pair in edges if pair[0] == "wms"], {
        pair: where for pair, where in edges.items() if pair[0] == "wms"
    }


def test_the_agent_imports_no_server_code_and_no_server_code_imports_it(graph):
    assert not agent_imports_outside(graph)
    importers = {
        a: where
        for (a, b), where in graph.app_edges().items()
        if b == "pilots.agent" and a not in ("devtools", "benchmarks")
    }
    assert not importers, importers


def test_no_circle_of_imports_between_modules(graph):
    assert graph.circles() == []


def test_the_graph_sees_the_whole_project(graph):
    """The checks look at every app (a package missing from PACKAGES would escape them)."""
    top = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
    assert top <= set(PACKAGES), top - set(PACKAGES)
    assert len(graph.paths) > 100 and sum(len(t) for t in graph.imports.values()) > 300


# --- the checks themselves, on planted sources ---------------------------------------------------


def plant(tmp_path: Path, files: dict[str, str]) -> Graph:
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if str(parent) != ".":
                (tmp_path / parent / "__init__.py").touch()
        path.write_text(text)
    return Graph(tmp_path)


def test_a_planted_circle_is_caught_even_through_an_import_inside_a_function(tmp_path):
    graph = plant(
        tmp_path,
        {
            "jobs/services.py": "from jobs import executor\n",
            "jobs/executor.py": "from wms.kicks import kick\n",
            "wms/kicks.py": "def kick():\n    from jobs.services import x\n",
        },
    )
    assert graph.circles() == [["jobs.executor", "jobs.services", "wms.kicks"]]


def test_a_planted_upward_import_is_caught_with_its_place(tmp_path):
    graph = plant(
        tmp_path,
        {
            "files/services.py": "def kick():\n    from tasks.models import TaskInput\n",
            "jobs/api/views.py": "from ...pilots import auth\n",
            "tasks/models.py": "TaskInput = 1\n",
            "pilots/auth.py": "",
        },
    )
    assert upward_edges(graph) == {
        ("files", "tasks"): ["files/services.py:2"],
        ("jobs", "pilots"): ["jobs/api/views.py:1"],
    }
    assert graph.circles() == []


def test_a_planted_agent_import_of_server_code_is_caught(tmp_path):
    graph = plant(
        tmp_path,
        {
            "pilots/agent/agent.py": "from wms import contract\nfrom wms.bus import publish\n",
            "wms/contract.py": "",
            "wms/bus.py": "publish = 1\n",
        },
    )
    assert agent_imports_outside(graph) == ["pilots/agent/agent.py:2 imports wms.bus"]


def test_allowed_directions_and_other_libraries_are_no_edge(tmp_path):
    graph = plant(
        tmp_path,
        {
            "tasks/services.py": "from jobs.models import Job\nimport django\n",
            "jobs/models.py": "from files import models\n",
            "files/models.py": "from wms.models import TransitionLog\n",
            "wms/models.py": "TransitionLog = 1\n",
            "devtools/demo.py": "from tasks import services\n",
        },
    )
    assert upward_edges(graph) == {}
    assert set(graph.app_edges()) == {
        ("tasks", "jobs"),
        ("jobs", "files"),
        ("files", "wms"),
        ("devtools", "tasks"),
    }


def test_each_shared_constant_is_defined_once():
    """The Django choices of device types and command kinds are the contract's values (the
    agent, Django-free, reads the contract; the models read the choices)."""
    from pilots.models import CommandKind
    from wms import contract, topology
    from wms.choices import DeviceType

    assert tuple(DeviceType.values) == contract.DEVICE_TYPES
    assert tuple(CommandKind.values) == contract.COMMANDS
    assert topology.DEVICE_TYPES is contract.DEVICE_TYPES
    definitions = [
        f"{path.relative_to(ROOT)}"
        for path in ROOT.rglob("*.py")
        if ".venv" not in path.parts
        and "tests" not in path.parts
        and any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "DEVICE_TYPES" for t in node.targets)
            for node in ast.parse(path.read_text()).body
        )
    ]
    assert definitions == ["wms/contract/messages.py"]


MAX_MODULE_LINES = 600


def test_no_module_is_longer_than_600_lines():
    """Modules by responsibility: a long module hides mistakes (migrations, written by
    Django, are left out)."""
    long = {
        str(path.relative_to(ROOT)): n
        for path in ROOT.rglob("*.py")
        if not {".venv", "migrations", "node_modules"} & set(path.parts)
        and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_every_project_package_is_installed_by_the_package():
    """``pip install`` (not only a checkout on ``sys.path``) carries every app in
    INSTALLED_APPS and every top-level package of the project: a package left out of
    ``[tool.setuptools.packages.find]`` imports from the repository's folder only (a worker
    started elsewhere, a wheel, an image) and fails at ``django.setup()``."""
    import fnmatch
    import tomllib

    from django.conf import settings

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    ours = {
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if path.parent.name not in {"tests", "benchmarks"}
    }
    ours |= {
        app.split(".")[0] for app in settings.INSTALLED_APPS if (ROOT / app.split(".")[0]).is_dir()
    }
    missing = sorted(p for p in ours if not any(fnmatch.fnmatch(p, pat) for pat in include))
    assert missing == []
