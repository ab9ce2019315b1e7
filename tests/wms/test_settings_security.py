"""Safe settings: with no DJANGO_* variable DEBUG is off, the secret is this installation's own
(made once, mode 0600) and only localhost names are served; production settings pass
``manage.py check --deploy`` with no warning, each transport setting switchable by env."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SHOW = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({k: getattr(s, k) for k in ("
    "'DEBUG', 'SECRET_KEY', 'ALLOWED_HOSTS', 'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', "
    "'CSRF_COOKIE_SECURE', 'SECURE_HSTS_SECONDS', 'SECURE_HSTS_INCLUDE_SUBDOMAINS', "
    "'SECURE_HSTS_PRELOAD', 'SECURE_PROXY_SSL_HEADER')}))"
)


@pytest.fixture
def bare_env(tmp_path):
    """The environment with no DJANGO_* variable (and the embedded database)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DJANGO_") and k not in ("DATABASE_URL", "WMS_ENV_FILE")
    }
    env.update(DJANGO_SETTINGS_MODULE="config.settings", WMS_VAR_DIR=str(tmp_path / "var"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _settings(env: dict) -> dict:
    proc = _run(env, "-c", SHOW)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_with_no_django_variable_the_settings_are_safe(bare_env, tmp_path):
    values = _settings(bare_env)

    assert values["DEBUG"] is False
    assert "*" not in values["ALLOWED_HOSTS"]
    assert set(values["ALLOWED_HOSTS"]) == {"localhost", "127.0.0.1", "[::1]"}
    assert not values["SECRET_KEY"].startswith("django-insecure")
    key_file = tmp_path / "var" / "secret_key"
    assert key_file.read_text().strip() == values["SECRET_KEY"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(values["SECRET_KEY"]) >= 50
    # made once: the next process (a worker, another manage.py) signs with the same key
    assert _settings(bare_env)["SECRET_KEY"] == values["SECRET_KEY"]
    other = dict(bare_env, WMS_VAR_DIR=str(tmp_path / "elsewhere"))
    assert _settings(other)["SECRET_KEY"] != values["SECRET_KEY"]  # no fixed secret
    assert values["SECURE_SSL_REDIRECT"] and values["SECURE_HSTS_SECONDS"] >= 31_536_000


def test_development_mode_is_switched_on_explicitly(bare_env):
    values = _settings(dict(bare_env, DJANGO_DEBUG="true"))
    assert values["DEBUG"] is True
    assert not values["SECURE_SSL_REDIRECT"] and values["SECURE_HSTS_SECONDS"] == 0
    assert not values["SESSION_COOKIE_SECURE"] and not values["CSRF_COOKIE_SECURE"]


def test_production_settings_pass_check_deploy_with_no_warning(bare_env):
    production = dict(
        bare_env,
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY="x7" * 30 + "-a-long-random-secret-of-this-site",
        DJANGO_ALLOWED_HOSTS="wms.example.org",
    )
    proc = _run(production, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues" in proc.stdout
    # with nothing set at all, too
    bare = _run(bare_env, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert bare.returncode == 0, bare.stdout + bare.stderr


def test_each_transport_setting_is_switchable_for_a_tls_proxy(bare_env):
    values = _settings(
        dict(
            bare_env,
            DJANGO_SECURE_SSL_REDIRECT="false",
            DJANGO_SESSION_COOKIE_SECURE="false",
            DJANGO_CSRF_COOKIE_SECURE="false",
            DJANGO_SECURE_HSTS_SECONDS="0",
            DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="false",
            DJANGO_SECURE_HSTS_PRELOAD="false",
            DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        )
    )
    assert values["DEBUG"] is False
    assert not values["SECURE_SSL_REDIRECT"] and not values["SECURE_HSTS_PRELOAD"]
    assert not values["SESSION_COOKIE_SECURE"] and not values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_HSTS_SECONDS"] == 0 and not values["SECURE_HSTS_INCLUDE_SUBDOMAINS"]
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    proc = _run(
        dict(bare_env, DJANGO_SECURE_SSL_REDIRECT="false"),
        "manage.py",
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
    )
    assert proc.returncode != 0 and "W008" in proc.stderr + proc.stdout  # check says so


@pytest.mark.django_db
def test_the_404_page_does_not_list_the_urlconf(client, settings):
    assert settings.DEBUG is False
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    assert "URLconf" not in response.content.decode()
    assert "admin/" not in response.content.decode()


@pytest.mark.django_db
def test_production_answers_redirect_to_https_and_send_hsts(client, settings):
    settings.SECURE_SSL_REDIRECT = True  # as production has it (tests/conftest.py turns it off)
    plain = client.get("/api/v1/tasks/")
    assert plain.status_code == 301 and plain["Location"].startswith("https://")
    assert client.get("/healthz").status_code in (200, 503)  # health checks stay plain HTTP
    secure = client.get("/api/v1/tasks/", secure=True)
    assert "max-age=31536000" in secure["Strict-Transport-Security"]
    assert "includeSubDomains" in secure["Strict-Transport-Security"]
    assert "preload" in secure["Strict-Transport-Security"]
