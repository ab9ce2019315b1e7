"""Layering (DESIGN.md section 2): views, serializers, API modules, Celery task modules,
management commands and admin modules never write models directly; they call a service.

A static check with ``ast``: in those modules, no attribute call named like a model write
(``x.save(...)``, ``qs.update(...)``, ``Model.objects.create(...)``, ...), whatever ``x`` is.
A legitimate call that is not a model write (say ``headers.update(...)`` on a local dict) goes
in ``ALLOWED`` by its file and its exact line, or better, is written another way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRITE_METHODS = frozenset(
    {
        "save",
        "update",
        "delete",
        "create",
        "bulk_create",
        "bulk_update",
        "get_or_create",
        "update_or_create",
    }
)

# Where thin code lives, relative to an app package.
THIN_PATTERNS = (
    "api.py",
    "api/**/*.py",
    "views.py",
    "views/**/*.py",
    "serializers.py",
    "serializers/**/*.py",
    "tasks.py",
    "admin.py",
    "admin/**/*.py",
    "management/commands/*.py",
)

SKIP_DIRS = {"tests", "migrations", "var", "docs", "benchmarks", "node_modules"}

# (path relative to the project root, the stripped source line): calls that are not model writes.
ALLOWED: set[tuple[str, str]] = {
    # a plain dict of validation errors being merged
    ("wms/api.py", "errors.update(exc.detail)"),
}


def app_packages(root: Path) -> list[Path]:
    """The project's top-level Python packages (the apps, config, wms)."""
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in SKIP_DIRS
        and (p / "__init__.py").is_file()
    )


def thin_modules(root: Path) -> list[Path]:
    found: set[Path] = set()
    for app in app_packages(root):
        for pattern in THIN_PATTERNS:
            found.update(p for p in app.glob(pattern) if "migrations" not in p.parts)
    return sorted(found)


def write_calls(source: str, filename: str = "<src>") -> list[tuple[int, str, str]]:
    """(line, method, source line) of every ``<anything>.<write method>(...)`` call."""
    tree = ast.parse(source, filename=filename)
    lines = source.splitlines()
    return [
        (node.lineno, node.func.attr, lines[node.lineno - 1].strip())
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in WRITE_METHODS
    ]


def violations(root: Path) -> list[str]:
    out = []
    for path in thin_modules(root):
        rel = path.relative_to(root).as_posix()
        for lineno, method, line in write_calls(path.read_text(), rel):
            if (rel, line) not in ALLOWED:
                out.append(f"{rel}:{lineno}: .{method}(...) -> call a service: {line}")
    return sorted(out)


# --- the check on the real tree ----------------------------------------------------------------


def test_thin_layers_call_services_instead_of_writing_models():
    assert thin_modules(ROOT), "found no module to check: the patterns are wrong"
    found = violations(ROOT)
    assert not found, "direct model writes outside services:\n" + "\n".join(found)


def test_the_check_looks_where_it_should():
    checked = {p.relative_to(ROOT).as_posix() for p in thin_modules(ROOT)}
    assert "wms/views.py" in checked
    assert not [p for p in checked if p.startswith(("tests/", ".venv/"))]
    assert not [p for p in checked if p.endswith(("services.py", "selectors.py", "models.py"))]
    # jobs and tasks keep their writes in modules named by responsibility: service modules too
    for service in SERVICE_MODULES:
        assert (ROOT / service).is_file(), service
        assert service not in checked, service


SERVICE_MODULES = (
    "jobs/control.py",
    "jobs/start.py",
    "jobs/reports.py",
    "jobs/outputs.py",
    "jobs/build.py",
    "jobs/executor.py",
    "tasks/create.py",
    "tasks/inputs.py",
    "tasks/lifecycle.py",
    "tasks/finalizer.py",
    "tasks/splitter.py",
    "tasks/merger.py",
)


# --- the checker itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "Task.objects.filter(pk=1).update(state='running')",
        "task.save()",
        "task.save(update_fields=['rank'])",
        "Job.objects.create(task=t)",
        "Job.objects.bulk_create(jobs, batch_size=100)",
        "Job.objects.bulk_update(jobs, ['rank'])",
        "File.objects.filter(job=j).delete()",
        "obj.delete()",
        "Pilot.objects.get_or_create(hostname='x')",
        "Pilot.objects.update_or_create(hostname='x', defaults={})",
        "serializer.save()",
        "super().save(*args, **kwargs)",
        "self.get_queryset().update(rank=F('rank') + 1)",
    ],
)
def test_write_calls_are_found(code):
    calls = write_calls(f"def view(request):\n    {code}\n")
    assert len(calls) == 1 and calls[0][0] == 2


@pytest.mark.parametrize(
    "code",
    [
        "task_update(task_id=1, rank=2)",
        "Task.objects.filter(pk=1).values('state')",
        "save(x)",  # a plain function named save is not an attribute call
        "updated = True",
        "x.updated_at",
        "serializer.is_valid(raise_exception=True)",
    ],
)
def test_reads_and_service_calls_are_not_flagged(code):
    assert write_calls(f"def view(request):\n    {code}\n") == []


def test_an_update_added_to_an_api_module_fails_the_check(tmp_path):
    app = tmp_path / "tasks"
    (app / "api").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "api" / "__init__.py").write_text("")
    (app / "api" / "views.py").write_text(
        "from tasks.models import Task\n\n\ndef bump(request, pk):\n"
        "    Task.objects.filter(pk=pk).update(rank=5)\n"
    )
    (app / "services.py").write_text("def task_bump(t):\n    t.save()\n")  # allowed here
    (app / "tasks.py").write_text("def run(job):\n    job.delete()\n")
    (app / "management" / "commands").mkdir(parents=True)
    (app / "management" / "commands" / "fix.py").write_text(
        "def handle():\n    x.bulk_create([])\n"
    )
    (app / "admin.py").write_text(
        "def save_model(self, request, obj, form, change):\n    obj.save()\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "views.py").write_text("def f(o):\n    o.save()\n")

    found = violations(tmp_path)

    assert found == [
        "tasks/admin.py:2: .save(...) -> call a service: obj.save()",
        "tasks/api/views.py:5: .update(...) -> call a service: "
        "Task.objects.filter(pk=pk).update(rank=5)",
        "tasks/management/commands/fix.py:2: .bulk_create(...) -> call a service: "
        "x.bulk_create([])",
        "tasks/tasks.py:2: .delete(...) -> call a service: job.delete()",
    ]
