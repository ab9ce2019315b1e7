"""Hostile input under /api/ is refused with the error body before it costs anything
(wms.middleware, wms.parsers, wms.api); each refusal leaves the database as it was.

Every class is tried on users' endpoints and on the pilot protocol (register, start, report,
heartbeat, events), with JSON and form-encoded bodies.
"""

from __future__ import annotations

import base64
import json

import pytest
from django.http import HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.test import RequestFactory
from rest_framework.test import APIClient

from files.models import Dataset, DatasetEntry
from jobs.models import Job, JobAttempt, JobState, JobTransition
from pilots.models import Pilot
from tasks.models import Task
from tests.factories import DatasetFactory, JobFactory, TaskFactory, api_token

pytestmark = pytest.mark.django_db

HOLE = '"@@HOLE@@"'  # where the hostile JSON text goes in a body


def snapshot() -> dict:
    """What a refused request must not change."""
    return {
        "tasks": list(Task.objects.order_by("pk").values_list("pk", "state", "name")),
        "datasets": Dataset.objects.count(),
        "entries": DatasetEntry.objects.count(),
        "jobs": list(Job.objects.order_by("pk").values_list("pk", "state", "cur_retry")),
        "attempts": list(JobAttempt.objects.order_by("pk").values_list("pk", "state")),
        "transitions": JobTransition.objects.count(),
        "pilots": list(
            Pilot.objects.order_by("pk").values_list("pk", "state", "last_heartbeat", "status")
        ),
    }


@pytest.fixture
def world(make_pilot, admin_user, user):
    """The endpoints to attack, each ``(client, path, body with a HOLE, field at the HOLE)``."""
    pilot, pilot_client = make_pilot()
    user_client = APIClient()
    user_client.force_authenticate(user=user)
    staff_client = APIClient()
    staff_client.force_authenticate(user=admin_user)
    task = TaskFactory(owner=user)
    queued = JobFactory(task=task, state=JobState.QUEUED)
    running = JobFactory(task=task, state=JobState.QUEUED)
    started = pilot_client.post(f"/api/v1/jobs/{running.uuid}/start/", {"attempt": 0}, "json")
    assert started.status_code == 200, started.content
    event = {"job_uuid": str(running.uuid), "attempt": 0, "state": "failed"}
    return {
        "task create": (
            user_client,
            "/api/v1/tasks/",
            {"name": "@@HOLE@@", "executable": "x", "data_in_uid": str(DatasetFactory().uid)},
            "name",
        ),
        "dataset create": (user_client, "/api/v1/datasets/", {"name": "@@HOLE@@"}, "name"),
        "pilot register": (
            staff_client,
            "/api/v1/pilots/register/",
            {"hostname": "wn1", "metrics": {"load": "@@HOLE@@"}},
            "metrics.load",
        ),
        "job start": (
            pilot_client,
            f"/api/v1/jobs/{queued.uuid}/start/",
            {"attempt": "@@HOLE@@"},
            "attempt",
        ),
        "job report": (
            pilot_client,
            f"/api/v1/jobs/{running.uuid}/report/",
            {"attempt": 0, "state": "failed", "metrics": {"cpu": [1, "@@HOLE@@"]}},
            "metrics.cpu[1]",
        ),
        "heartbeat": (
            pilot_client,
            f"/api/v1/pilots/{pilot.pk}/heartbeat/",
            {"state": "idle", "status": "@@HOLE@@"},
            "status",
        ),
        "events": (
            pilot_client,
            f"/api/v1/pilots/{pilot.pk}/events/",
            {"events": [event, {**event, "error_message": "@@HOLE@@"}]},
            "events[1].error_message",
        ),
    }


ENDPOINTS = [
    "task create",
    "dataset create",
    "pilot register",
    "job start",
    "job report",
    "heartbeat",
    "events",
]


def post_json(client, path: str, text: str, **extra):
    return client.generic("POST", path, text, content_type="application/json", **extra)


def with_hole(body: dict, hostile: str) -> str:
    text = json.dumps(body)
    assert HOLE in text
    return text.replace(HOLE, hostile)


# --- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "hostile", ['"a\\u0000b"', "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400 + ".0"]
)
def test_nul_and_non_finite_numbers_answer_400_naming_the_field(world, endpoint, hostile):
    client, path, body, field = world[endpoint]
    before = snapshot()

    response = post_json(client, path, with_hole(body, hostile))

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == [field]
    assert snapshot() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_nul_in_a_key_answers_400_naming_it(world, endpoint):
    client, path, body, _field = world[endpoint]
    before = snapshot()

    response = post_json(client, path, with_hole(body, '{"x\\u0000": 1}'))

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    (named,) = response.json()["detail"]
    assert named.endswith("x\x00")
    assert snapshot() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("depth", [33, 100_000])
def test_json_nested_deeper_than_the_limit_answers_400(world, endpoint, depth):
    client, path, body, _field = world[endpoint]
    before = snapshot()

    response = post_json(client, path, with_hole(body, "[" * depth + "]" * depth))

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "parse_error"
    assert "deeper than 32" in response.json()["detail"]
    assert snapshot() == before


def test_json_at_the_depth_limit_and_brackets_inside_strings_pass(world):
    client, path, body, _field = world["job report"]
    nested = "[" * 29 + "]" * 29  # 32 levels with the body's own 3
    body = {**body, "error_message": "[{" * 100}

    response = post_json(client, path, with_hole(body, nested))

    assert response.status_code == 200, response.content
    assert response.json()["outcome"] == "applied"


def test_a_nul_escape_that_is_not_a_nul_passes(world):
    """``\\\\u0000`` is a backslash followed by 'u0000': allowed."""
    client, path, body, _field = world["heartbeat"]
    response = post_json(client, path, with_hole(body, '"C:\\\\u0000"'))
    assert response.status_code == 200, response.content
    assert Pilot.objects.get(pk=path.split("/")[4]).status == "C:\\u0000"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_body_over_the_limit_answers_413_before_it_is_read(world, endpoint, settings):
    client, path, body, _field = world[endpoint]
    settings.WMS_API_MAX_BODY = 10_000
    before = snapshot()

    response = post_json(client, path, with_hole(body, json.dumps("x" * 10_000)))

    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"
    assert "10000 bytes" in response.json()["detail"]
    assert snapshot() == before


def test_the_default_limit_takes_a_3_mb_body_and_refuses_17_mib(world):
    client, path, body, _field = world["task create"]
    before = snapshot()

    three_mb = post_json(client, path, with_hole(body, json.dumps("x" * 3_000_000)))
    assert three_mb.status_code == 400  # read and validated: the name is too long
    assert list(three_mb.json()["detail"]) == ["name"]

    huge = post_json(client, path, with_hole(body, json.dumps("x" * (17 << 20))))
    assert huge.status_code == 413
    assert huge.json()["error"] == "request_too_large"
    assert snapshot() == before


def test_a_malformed_content_length_answers_400(world):
    client, path, body, _field = world["heartbeat"]
    before = snapshot()
    response = post_json(client, path, with_hole(body, '"x"'), CONTENT_LENGTH="12x")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert snapshot() == before


def test_malformed_json_answers_400_parse_error(world):
    client, path, _body, _field = world["job report"]
    before = snapshot()
    response = post_json(client, path, '{"attempt": 0, "state": ')
    assert response.status_code == 400
    assert response.json()["error"] == "parse_error"
    assert snapshot() == before


# --- forms -----------------------------------------------------------------------------------


FORMS = {
    "task create": "name=a%00b&executable=x",
    "dataset create": "name=a%00b",
    "pilot register": "hostname=a%00b",
    "job start": "attempt=0%00",
    "job report": "attempt=0&state=failed&error_message=a%00b",
    "heartbeat": "state=idle&status=a%00b",
}


def post_form(client, path: str, text: str):
    return client.generic("POST", path, text, content_type="application/x-www-form-urlencoded")


@pytest.mark.parametrize("endpoint", sorted(FORMS))
def test_a_nul_in_a_form_value_answers_400_naming_the_field(world, endpoint):
    client, path, _body, _field = world[endpoint]
    before = snapshot()

    response = post_form(client, path, FORMS[endpoint])

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    named = FORMS[endpoint].split("%00")[0].rsplit("&", 1)[-1].split("=")[0]
    assert list(response.json()["detail"]) == [named]
    assert snapshot() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_too_many_form_fields_answer_400(world, endpoint):
    client, path, _body, _field = world[endpoint]
    before = snapshot()

    response = post_form(client, path, "&".join(f"f{i}=1" for i in range(1500)))

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "parse_error"
    assert "form fields" in response.json()["detail"]
    assert snapshot() == before


def test_a_form_body_over_the_limit_answers_413(world, settings):
    client, path, _body, _field = world["dataset create"]
    settings.WMS_API_MAX_BODY = 1000
    before = snapshot()
    response = post_form(client, path, "name=" + "x" * 2000)
    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"
    assert snapshot() == before


# --- paths and query strings -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/datasets/a%00b/",
        "/api/v1/tasks/1%00/",
        "/api/v1/jobs/%00/report/",
        "/api/v1/no-such%00thing/",
    ],
)
def test_a_nul_in_the_path_answers_400(api_client, path):
    for method in ("get", "post"):
        response = getattr(api_client, method)(path)
        assert response.status_code == 400, (method, response.content)
        assert response.json() == {
            "error": "validation_failed",
            "detail": {"path": ["The NUL character is not allowed."]},
        }


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("name=a%00b", "name"),
        ("state=running&owner%00=x", "owner\x00"),
        ("page=1%00", "page"),
        ("cursor=%00", "cursor"),
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/tasks/", "/api/v1/jobs/", "/api/v1/datasets/"])
def test_a_nul_in_a_query_parameter_answers_400_naming_it(api_client, path, query, named):
    response = api_client.get(f"{path}?{query}")
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == [named]


def test_a_nul_in_a_pilot_call_query_answers_400(world):
    client, path, body, _field = world["heartbeat"]
    before = snapshot()
    response = post_json(client, f"{path}?x=%00", with_hole(body, '"ok"'))
    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["x"]
    assert snapshot() == before


def _cursor(**tokens: str) -> str:
    return base64.b64encode("&".join(f"{k}={v}" for k, v in tokens.items()).encode()).decode()


@pytest.mark.parametrize(
    ("path", "query", "named"),
    [
        ("/api/v1/tasks/", {"page": "abc"}, "page"),
        ("/api/v1/tasks/", {"page": "0"}, "page"),
        ("/api/v1/tasks/", {"page": "-1"}, "page"),
        ("/api/v1/tasks/", {"page": "9" * 5000}, "page"),
        ("/api/v1/datasets/", {"page": "1.5"}, "page"),
        ("/api/v1/pilots/", {"page": "²"}, "page"),
        ("/api/v1/tasks/", {"page_size": "0"}, "page_size"),
        ("/api/v1/tasks/", {"page_size": "abc"}, "page_size"),
        ("/api/v1/tasks/", {"page_size": "1001"}, "page_size"),
        ("/api/v1/jobs/", {"page_size": "-5"}, "page_size"),
        ("/api/v1/jobs/", {"page_size": "9" * 5000}, "page_size"),
        ("/api/v1/datasets/", {"page_size": "9" * 5000}, "page_size"),
        ("/api/v1/jobs/", {"cursor": _cursor(o="9" * 5000)}, "cursor"),
        ("/api/v1/jobs/", {"cursor": "garbage"}, "cursor"),
        ("/api/v1/jobs/", {"cursor": _cursor(o="x")}, "cursor"),
        ("/api/v1/jobs/", {"cursor": _cursor(p="abc")}, "cursor"),
        ("/api/v1/jobs/", {"cursor": _cursor(p=str(2**70))}, "cursor"),
        ("/api/v1/files/", {"cursor": _cursor(p="1 OR 1=1")}, "cursor"),
        ("/api/v1/jobs/", {"cursor": _cursor(p="1", r="x")}, "cursor"),
    ],
)
def test_bad_page_cursor_and_page_size_answer_400_naming_them(api_client, path, query, named):
    TaskFactory.create_batch(2)
    response = api_client.get(path, query)
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == [named]


def test_good_cursors_and_the_last_page_still_work(api_client, user):
    task = TaskFactory(owner=user)
    JobFactory.create_batch(3, task=task)
    first = api_client.get("/api/v1/jobs/", {"page_size": 2}).json()
    second = api_client.get(first["next"])
    assert second.status_code == 200
    assert len(first["results"]) + len(second.json()["results"]) == 3
    TaskFactory.create_batch(2, owner=user)
    last = api_client.get("/api/v1/tasks/", {"page": "last", "page_size": 2})
    assert last.status_code == 200
    assert len(last.json()["results"]) == 1


# --- unknown URLs, wrong methods, CSRF, Django's refusals ---------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/", "/api/nothing/", "/api/v2/tasks/", "/api/v1/tasks/1/x", "/api/schema/x/", "/api/x"],
)
@pytest.mark.parametrize("method", ["get", "post", "delete"])
def test_unknown_urls_anywhere_under_api_answer_404_json(api_client, path, method, settings):
    response = getattr(api_client, method)(path, follow=True)  # no slash: APPEND_SLASH first
    assert response.status_code == 404, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize("path", ["/api/nothing/", "/api/v1/tasks/1/x/"])
def test_unknown_urls_under_api_answer_json_in_debug_too(api_client, settings, path):
    settings.DEBUG = True
    response = api_client.get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_unknown_urls_outside_api_keep_djangos_page(client):
    response = client.get("/nothing/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/api/v1/pilots/register/"),
        ("delete", "/api/schema/"),
        ("post", "/api/docs/"),
        ("patch", "/api/v1/jobs/"),
        ("put", "/api/v1/tasks/"),
    ],
)
def test_wrong_methods_answer_405_json(admin_user, method, path):
    client = APIClient()
    client.force_authenticate(user=admin_user)
    response = getattr(client, method)(path)
    assert response.status_code == 405, response.content
    assert response.json()["error"] == "method_not_allowed"


def test_a_session_write_without_csrf_token_answers_403_json(user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    before = snapshot()

    response = client.post("/api/v1/datasets/", {"name": "ds"}, format="json")

    assert response.status_code == 403
    assert response.json()["error"] == "permission_denied"
    assert "CSRF" in response.json()["detail"]
    assert snapshot() == before


@pytest.mark.parametrize(("path", "json_body"), [("/api/v1/x/", True), ("/admin/x/", False)])
def test_the_csrf_failure_view_answers_json_under_api_only(path, json_body):
    """Django's CSRF check (views that are not DRF's) fails into ``CSRF_FAILURE_VIEW``."""
    request = RequestFactory().post(path, {"a": "1"})
    middleware = CsrfViewMiddleware(lambda r: HttpResponse("ok"))
    middleware.process_request(request)

    response = middleware.process_view(request, lambda r: HttpResponse("ok"), (), {})

    assert response is not None
    assert response.status_code == 403
    if json_body:
        assert json.loads(response.content)["error"] == "permission_denied"
        assert "CSRF" in json.loads(response.content)["detail"]
    else:
        assert response["Content-Type"].startswith("text/html")


def test_a_disallowed_host_answers_400_json_under_api_and_html_elsewhere(client, settings):
    settings.ALLOWED_HOSTS = ["testserver"]
    api = client.get("/api/v1/tasks/", HTTP_HOST="evil.example")
    assert api.status_code == 400
    assert api.json() == {"error": "bad_request", "detail": "The request was refused as malformed."}
    admin = client.get("/admin/", HTTP_HOST="evil.example")
    assert admin.status_code == 400
    assert admin["Content-Type"].startswith("text/html")


def test_a_token_request_needs_no_csrf_token(user):
    _token, key = api_token(user)
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    response = client.post("/api/v1/datasets/", {"name": "ds"}, format="json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        ("[" * 33 + "]" * 33, True),
        ("[" * 32 + "]" * 32, False),
        ('{"a": ' * 33 + "1" + "}" * 33, True),
        ("[" + "[[]]," * 40 + "1]", False),  # many brackets, shallow
        ("[" * 20 + '"' + "]" * 30 + '",' + "[" * 20 + "]" * 40, True),  # closings in a string
        ('["\\"' + "[" * 40 + '"]', False),  # an escaped quote, then brackets in the string
        ('["\\\\", ' + "[" * 40 + "]" * 40 + "]", True),  # an escaped backslash ends no string
        ("[" * 100_000, True),
    ],
)
def test_the_depth_check_skips_strings(text, too_deep):
    from wms.parsers import json_too_deep

    assert json_too_deep(text, 32) is too_deep
