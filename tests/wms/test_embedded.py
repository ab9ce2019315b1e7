"""The embedded default: with no DATABASE_URL and no CELERY_BROKER_URL the project runs on a
SQLite file and kombu's filesystem transport under WMS_VAR_DIR (DESIGN.md section 7)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Anything that would point the child at a server or at another settings file.
UNSET = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "WMS_ENV_FILE",
    "DJANGO_SETTINGS_MODULE",
    "WMS_DSM_BACKEND",
    "WMS_DSM_URL",
)


@pytest.fixture
def embedded_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["WMS_VAR_DIR"] = str(tmp_path / "var")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_migrate_and_check_on_the_embedded_default(embedded_env, tmp_path):
    var = tmp_path / "var"

    _manage(embedded_env, "migrate", "--noinput")
    check = _manage(embedded_env, "check")

    assert "no issues" in check.stdout
    db = var / "wms.sqlite3"
    assert db.is_file() and db.stat().st_size > 0
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        applied = {r[0] for r in conn.execute("SELECT DISTINCT app FROM django_migrations")}
        (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
    assert {"tasks_task", "jobs_job", "jobs_jobattempt", "files_file", "pilots_pilot"} <= tables
    assert {"tasks", "jobs", "files", "pilots", "auth"} <= applied
    assert journal == "wal"  # several processes share the file
    # the filesystem broker's folders live under the same var dir
    assert (var / "broker" / "out").is_dir() and (var / "broker" / "processed").is_dir()


@pytest.mark.slow
def test_the_embedded_settings_are_sqlite_and_filesystem(embedded_env, tmp_path):
    proc = _manage(
        embedded_env,
        "shell",
        "-c",
        "from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE']); print(s.DATABASES['default']['NAME']); "
        "print(s.CELERY_BROKER_URL)",
    )
    engine, name, broker = proc.stdout.strip().splitlines()[-3:]
    assert engine == "django.db.backends.sqlite3"
    assert Path(name) == tmp_path / "var" / "wms.sqlite3"
    assert broker.startswith("filesystem://")


@pytest.mark.slow
def test_models_and_migrations_agree(embedded_env):
    """A model change without its migration would break every fresh install."""
    _manage(embedded_env, "makemigrations", "--check", "--dry-run")
