"""The schema's limits are the server's (issue 12): every integer of a request within its
column's range, every string and list within the length the server takes, every answer the
API can give documented. Each refusal answers 400 naming the field and changes nothing."""

from __future__ import annotations

import pytest
import yaml
from django.core.management import call_command
from drf_spectacular.drainage import GENERATOR_STATS

from files.dsm import get_dsm, iter_files
from files.models import DatasetEntry, File
from jobs.events import MAX_OUTPUTS, MAX_SIZE, clean_event
from jobs.models import Job, JobAttempt, JobState, JobTransition
from tests.factories import JobFactory
from wms import checksums
from wms.exceptions import ValidationFailed
from wms.schema import GENERIC_ERRORS

pytestmark = pytest.mark.django_db

TOO_BIG = 2**64


@pytest.fixture(scope="module")
def schema(tmp_path_factory, django_db_blocker):
    GENERATOR_STATS.reset()
    path = tmp_path_factory.mktemp("schema") / "schema.yml"
    with django_db_blocker.unblock():
        call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))
    return yaml.safe_load(path.read_text())


def _request_components(schema):
    """The names of every component a request body reaches."""
    components = schema["components"]["schemas"]
    todo = [
        content["schema"]["$ref"].rsplit("/", 1)[1]
        for operations in schema["paths"].values()
        for operation in operations.values()
        for content in operation.get("requestBody", {}).get("content", {}).values()
        if "$ref" in content["schema"]
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [ref.rsplit("/", 1)[1] for ref in _refs(components[name])]
    return seen


def _refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


_FREE_FORMATS = ("uuid", "date-time")


def _unbounded(node, where):
    """Every integer without a minimum and a maximum, string without maxLength (or an enum,
    a uuid, a time), list without maxItems, in a request's schema."""
    if not isinstance(node, dict) or node.get("readOnly") or "$ref" in node:
        return
    kind = node.get("type")
    if kind == "object":
        for name, sub in node.get("properties", {}).items():
            yield from _unbounded(sub, f"{where}.{name}")
    elif kind == "integer":
        if "minimum" not in node or "maximum" not in node:
            yield where
    elif kind == "string":
        if not ("maxLength" in node or "enum" in node or node.get("format") in _FREE_FORMATS):
            yield where
    elif kind == "array":
        if "maxItems" not in node:
            yield where
        yield from _unbounded(node.get("items", {}), f"{where}[]")


# --- the schema -----------------------------------------------------------------------------------


def test_every_operation_documents_the_generic_answers(schema):
    checked = 0
    for path, operations in schema["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method, operation in operations.items():
            codes = set(operation["responses"])
            expected = {str(code) for code in GENERIC_ERRORS if code != 413}
            if "requestBody" in operation:
                expected.add("413")
                assert set(operation["requestBody"]["content"]) == {"application/json"}
            assert expected <= codes, (method, path, expected - codes)
            for code in ("429", "503"):
                assert "Retry-After" in operation["responses"][code]["headers"]
            checked += 1
    assert checked > 30


def test_every_integer_string_and_list_of_a_request_body_is_bounded(schema):
    components = schema["components"]["schemas"]
    unbounded = [
        where
        for name in sorted(_request_components(schema))
        for where in _unbounded(components[name], name)
    ]
    assert unbounded == []


def test_every_query_parameter_is_bounded_but_the_listed_ones(schema):
    # Left unbounded on purpose: ``ordering`` (unknown terms are ignored, as DRF does),
    # ``cursor`` (opaque, checked by the paginator) and the repeatable ``state`` filters.
    free = {"ordering", "cursor", "state", "page"}
    unbounded = [
        f"{method} {path} {parameter['name']}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", ())
        if parameter["in"] == "query" and parameter["name"] not in free
        for _ in _unbounded(parameter["schema"], parameter["name"])
    ]
    assert unbounded == []


def test_the_schema_gives_the_limits_the_server_enforces(schema):
    components = schema["components"]["schemas"]
    output = components["JobOutputFileRequest"]["properties"]
    assert output["size"]["maximum"] == MAX_SIZE
    assert components["JobReportRequest"]["properties"]["outputs"]["maxItems"] == MAX_OUTPUTS
    ids = components["JobsBulkActionRequest"]["properties"]["ids"]
    assert ids["maxItems"] == 10_000
    assert ids["items"]["maximum"] == 2**63 - 1
    jobs = {p["name"]: p for p in schema["paths"]["/api/v1/jobs/"]["get"]["parameters"]}
    assert jobs["task"]["schema"]["minimum"] == 1
    assert jobs["task"]["schema"]["maximum"] == 2**63 - 1
    assert jobs["page_size"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    pilots = {p["name"]: p for p in schema["paths"]["/api/v1/pilots/"]["get"]["parameters"]}
    assert pilots["hostname"]["schema"]["maxLength"] == 255


# --- the server -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("/api/v1/jobs/", "task"),
        ("/api/v1/jobs/", "pilot"),
        ("/api/v1/files/", "job"),
        ("/api/v1/files/", "task"),
        ("/api/v1/tasks/", "owner"),
    ],
)
@pytest.mark.parametrize("value", [str(TOO_BIG), "-1", "0", "1.5", "abc"])
def test_an_id_filter_out_of_range_answers_400_naming_the_parameter(
    api_client, path, parameter, value
):
    response = api_client.get(path, {parameter: value})

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    assert list(response.json()["detail"]) == [parameter]


@pytest.mark.parametrize(
    ("path", "parameter", "length"),
    [
        ("/api/v1/pilots/", "hostname", 255),
        ("/api/v1/pilots/", "site", 100),
        ("/api/v1/datasets/", "name", 255),
        ("/api/v1/datasets/", "name__icontains", 255),
        ("/api/v1/datasets/", "name__glob", 255),
    ],
)
def test_a_text_filter_longer_than_its_column_answers_400_naming_the_parameter(
    api_client, path, parameter, length
):
    assert api_client.get(path, {parameter: "x" * length}).status_code == 200

    response = api_client.get(path, {parameter: "x" * (length + 1)})

    assert response.status_code == 400, response.content
    assert list(response.json()["detail"]) == [parameter]


def _job_state(job):
    job.refresh_from_db()
    return (
        job.state,
        JobAttempt.objects.filter(job=job).values_list("state", flat=True).first(),
        JobTransition.objects.filter(subject=job).count(),
    )


@pytest.fixture
def running(make_pilot, output_task):
    """A job of ``output_task`` running on a pilot: (job, the pilot's client)."""
    pilot, client = make_pilot()
    job = JobFactory(task=output_task, state=JobState.QUEUED)
    response = client.post(f"/api/v1/jobs/{job.uuid}/start/", {"attempt": 0}, format="json")
    assert response.status_code == 200
    return job, client, pilot


def _output(**change):
    return {
        "name": "out.root",
        "type": "output",
        "size": 10,
        "check_sum": checksums.bytes_checksum(b"x"),
        "url": "file:///out/out.root",
        **change,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outputs": [_output(size=TOO_BIG)]}, "outputs"),
        ({"outputs": [_output(size=-1)]}, "outputs"),
        ({"exit_code": TOO_BIG}, "exit_code"),
        ({"pilot_id": TOO_BIG}, "pilot_id"),
        ({"attempt": TOO_BIG}, "attempt"),
        ({"outputs": [_output(name=f"o{i}") for i in range(MAX_OUTPUTS + 1)]}, "outputs"),
    ],
)
def test_a_pilot_report_out_of_range_is_refused_and_changes_nothing(running, body, field):
    job, client, _pilot = running
    before = _job_state(job)
    files = File.objects.count()
    entries = DatasetEntry.objects.count()

    response = client.post(
        f"/api/v1/jobs/{job.uuid}/report/",
        {"attempt": 0, "state": "finished", "exit_code": 0, **body},
        format="json",
    )

    assert response.status_code == 400, response.content
    assert response.json()["error"] == "validation_failed"
    assert field in response.json()["detail"]
    assert _job_state(job) == before
    assert File.objects.count() == files
    assert DatasetEntry.objects.count() == entries
    with get_dsm() as dsm:
        assert list(iter_files(dsm, job.task.data_out_uid)) == []


def test_the_bulk_events_and_the_bus_refuse_an_output_size_out_of_range(running):
    job, client, pilot = running
    before = _job_state(job)
    event = {
        "job_uuid": str(job.uuid),
        "attempt": 0,
        "state": "finished",
        "exit_code": 0,
        "outputs": [_output(size=TOO_BIG)],
    }

    response = client.post(f"/api/v1/pilots/{pilot.pk}/events/", {"events": [event]}, format="json")

    assert response.status_code == 200, response.content
    (result,) = response.json()["results"]
    assert result["error"] == "validation_failed"
    assert "size" in result["detail"]["outputs"][0]
    with pytest.raises(ValidationFailed) as refused:  # the bus's check is the same function
        clean_event({**event, "pilot_id": pilot.pk})
    assert "outputs" in refused.value.detail
    assert _job_state(job) == before
    assert File.objects.filter(job=job).count() == 0


@pytest.mark.parametrize(
    "ids",
    [
        "1,2",
        [[1]],
        {"a": 1},
        [1, "x"],
        None,
        [TOO_BIG],
        [0],
        [-1],
        [1.5],
        list(range(1, 10_002)),
    ],
)
def test_a_malformed_id_list_of_a_bulk_action_answers_400_naming_ids(api_client, user, ids):
    jobs = [JobFactory(task__owner=user, state=JobState.QUEUED) for _ in range(2)]
    before = sorted(Job.objects.values_list("id", "state"))
    transitions = JobTransition.objects.count()

    for action in ("cancel", "hold", "release"):
        response = api_client.post(f"/api/v1/jobs/{action}/", {"ids": ids}, format="json")

        assert response.status_code == 400, response.content
        assert response.json()["error"] == "validation_failed"
        assert list(response.json()["detail"]) == ["ids"]
    assert sorted(Job.objects.values_list("id", "state")) == before
    assert JobTransition.objects.count() == transitions
    assert len(jobs) == 2


def test_too_many_input_datasets_in_one_request_answers_400(api_client, user):
    from tasks.api.serializers import MAX_INPUTS_PER_REQUEST
    from tasks.models import Task

    uids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(MAX_INPUTS_PER_REQUEST + 1)]

    response = api_client.post(
        "/api/v1/tasks/",
        {"executable": "wms-payload-map", "data_in_uids": uids},
        format="json",
    )

    assert response.status_code == 400, response.content
    assert "data_in_uids" in response.json()["detail"]
    assert not Task.objects.exists()


def test_a_string_longer_than_its_max_length_before_trimming_answers_400(api_client):
    from files.models import Dataset

    name = "d" + "\x1c" * 255  # 256 characters; 1 once DRF trims the whitespace

    response = api_client.post("/api/v1/datasets/", {"name": name}, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()["detail"]) == ["name"]
    assert not Dataset.objects.filter(name="d").exists()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/jobs/cancel/", {"ids": [1], "reason": 5}, "reason"),
        ("/api/v1/datasets/", {"name": "a", "uid": 5}, "uid"),
        ("/api/v1/datasets/", {"name": 5}, "name"),
        ("/api/v1/tasks/", {"executable": "x", "data_in_uids": [], "rank": "5"}, "rank"),
        ("/api/v1/tasks/", {"executable": "x", "data_in_follow": 0}, "data_in_follow"),
    ],
)
def test_a_json_value_of_another_type_than_its_field_answers_400(api_client, path, body, field):
    from files.models import Dataset
    from tasks.models import Task

    datasets = Dataset.objects.count()

    response = api_client.post(path, body, format="json")

    assert response.status_code == 400, response.content
    assert field in response.json()["detail"]
    assert Dataset.objects.count() == datasets
    assert not Task.objects.exists()


@pytest.mark.parametrize(
    ("path", "parameter"),
    [("/api/v1/pilots/", "site"), ("/api/v1/jobs/", "task"), ("/api/v1/datasets/", "name")],
)
def test_a_one_value_parameter_given_twice_answers_400_naming_it(api_client, path, parameter):
    response = api_client.get(f"{path}?{parameter}=1&{parameter}=2")

    assert response.status_code == 400, response.content
    assert list(response.json()["detail"]) == [parameter]
    # A parameter that takes several values still does.
    assert api_client.get("/api/v1/jobs/?state=queued&state=running").status_code == 200


def test_a_list_item_of_another_type_than_its_field_answers_400(make_pilot):
    pilot, client = make_pilot()

    response = client.post(
        f"/api/v1/pilots/{pilot.pk}/heartbeat/",
        {"state": "idle", "acked_commands": [5]},
        format="json",
    )

    assert response.status_code == 400, response.content
    assert response.json()["detail"] == {"acked_commands": {"0": ["Must be a valid UUID."]}}
    pilot.refresh_from_db()
    assert pilot.state == "registered"
