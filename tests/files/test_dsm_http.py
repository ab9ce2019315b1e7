"""The ``http`` DSM backend against a real HTTP server on 127.0.0.1 (tests/files/fake_dsm.py).

No mock of requests: every call crosses a real socket. Timeouts are tiny (0.2 s read) and the
backoff is 10 ms, so the failure paths stay fast.
"""

import math
import socket
import time
import uuid

import pytest

from files.dsm import DatasetInfo, DatasetSpec, DSMClient, FileInfo, FilePage, iter_files
from files.dsm.http import HTTPDSMClient
from files.dsm.local import LocalDSMClient
from tests.files.fake_dsm import FakeDSM
from wms import checksums
from wms.exceptions import Conflict, DatasetClosed, DSMError, NotFound, ValidationFailed

TOKEN = "dsm-test-token"
READ_TIMEOUT = 0.2
RETRIES = 3
BACKOFF = 0.01


def specs(n, prefix="f", size=10):
    return [
        {
            "name": f"{prefix}.{i:06d}.root",
            "size": size,
            "check_sum": checksums.bytes_checksum(f"{prefix}{i}".encode()),
            "url": f"root://eos.example.org//data/{prefix}.{i:06d}.root",
        }
        for i in range(n)
    ]


class SleepRecorder:
    """Stands in for time.sleep in the client's backoff: records the delays, sleeps them."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def server():
    fake = FakeDSM(token=TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def sleeps():
    return SleepRecorder()


def make_client(url, sleeps=None, **kwargs):
    options = {
        "token": TOKEN,
        "timeout": (1.0, READ_TIMEOUT),
        "retries": RETRIES,
        "backoff": BACKOFF,
        "sleep": sleeps or time.sleep,
    }
    options.update(kwargs)
    return HTTPDSMClient(url, **options)


@pytest.fixture
def dsm(server, sleeps):
    client = make_client(server.url + "/", sleeps)
    yield client
    client.close()


@pytest.fixture
def dataset(dsm):
    return dsm.register_dataset("mc.run00042.evgen")


# --- the contract, happy paths --------------------------------------------------------------


def test_http_client_is_a_dsm_client(dsm):
    assert isinstance(dsm, DSMClient)


def test_register_and_get_dataset(dsm, server):
    uid = uuid.uuid4()
    info = dsm.register_dataset("data.http", role="output", uid=uid, location="root://eos//x")
    assert info == DatasetInfo(
        uid=uid,
        name="data.http",
        role="output",
        state="open",
        file_count=0,
        total_size=0,
        location="root://eos//x",
    )
    assert dsm.get_dataset(str(uid)) == info
    assert server.datasets[str(uid)].name == "data.http"
    post = server.requests[0]
    assert (post.method, post.path) == ("POST", "/datasets")
    assert post.body == {
        "name": "data.http",
        "role": "output",
        "location": "root://eos//x",
        "uid": str(uid),
    }
    assert post.headers["Content-Type"] == "application/json"


def test_the_bearer_token_is_sent_on_every_request(dsm, server, dataset):
    dsm.register_files(dataset.uid, specs(2))
    dsm.list_files(dataset.uid)
    dsm.close_dataset(dataset.uid)
    assert server.count() == 4
    assert {r.headers.get("Authorization") for r in server.requests} == {f"Bearer {TOKEN}"}


def test_a_wrong_token_is_a_dsm_error_without_retries(server, sleeps):
    with (
        make_client(server.url, sleeps, token="wrong") as client,
        pytest.raises(DSMError, match=r"credentials.*\(HTTP 401\)"),
    ):
        client.get_dataset(uuid.uuid4())
    assert server.count() == 1 and sleeps.delays == []


def test_register_datasets_in_bulk(dsm, server):
    out_uid = uuid.uuid4()
    infos = dsm.register_datasets(
        [{"name": "t.in"}, DatasetSpec(name="t.out", role="output", uid=out_uid)]
    )
    assert [(i.name, i.role) for i in infos] == [("t.in", "input"), ("t.out", "output")]
    assert infos[1].uid == out_uid
    assert server.count("POST", "/datasets/bulk") == 1


def test_register_datasets_is_all_or_none(dsm, server):
    dsm.register_dataset("taken")
    with pytest.raises(Conflict):
        dsm.register_datasets([{"name": "new"}, {"name": "taken"}])
    assert sorted(d.name for d in server.datasets.values()) == ["taken"]


def test_register_files_and_counters(dsm, dataset):
    wanted = specs(3, size=100)
    infos = dsm.register_files(dataset.uid, wanted)
    assert all(type(f) is FileInfo for f in infos)
    assert [(f.name, f.size, f.check_sum, f.url) for f in infos] == [
        (w["name"], w["size"], w["check_sum"], w["url"]) for w in wanted
    ]
    info = dsm.get_dataset(dataset.uid)
    assert (info.file_count, info.total_size) == (3, 300)


def test_close_dataset_is_idempotent(dsm, server, dataset):
    closed = dsm.close_dataset(dataset.uid, source="executor", reason="done")
    assert closed.state == "closed"
    assert dsm.close_dataset(dataset.uid) == closed
    assert server.requests[-2].body == {"source": "executor", "reason": "done"}


def test_cursor_paging_over_2500_files(dsm, server, dataset):
    registered = dsm.register_files(dataset.uid, specs(2500))
    before = server.count("GET")
    pages = []
    cursor = None
    while True:
        page = dsm.list_files(dataset.uid, after=cursor, limit=1000)
        pages.append(page)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [len(p.files) for p in pages] == [1000, 1000, 500]
    assert [f for p in pages for f in p.files] == registered
    assert server.count("GET") - before == 3
    queries = [r.query for r in server.requests if r.method == "GET"]
    assert queries[0] == {"limit": ["1000"]}
    assert queries[1] == {"limit": ["1000"], "after": [str(pages[0].files[-1].id)]}
    assert list(iter_files(dsm, dataset.uid, limit=1000)) == registered


def test_find_datasets_sends_the_glob_and_reads_the_selection(dsm, server):
    for name, role in [
        ("run2026.b.raw", "input"),
        ("run2026.a.raw", "input"),
        ("run2026_a_raw", "input"),
        ("run2026.A.raw", "output"),
        ("run2026.c.raw", "input"),
        ("RUN2026.a.raw", "input"),
    ]:
        dsm.register_dataset(name, role=role)
    closed = dsm.close_dataset(dsm.find_datasets("run2026.c.raw")[0].uid)
    before = server.count()

    found = dsm.find_datasets("run2026.?.raw")
    assert [d.name for d in found] == ["run2026.a.raw", "run2026.b.raw", "run2026.c.raw"]
    assert all(type(d) is DatasetInfo for d in found) and found[-1] == closed
    assert [d.name for d in dsm.find_datasets("run2026.?.raw", role=None)] == [
        "run2026.A.raw",
        "run2026.a.raw",
        "run2026.b.raw",
        "run2026.c.raw",
    ]
    assert [d.name for d in dsm.find_datasets("run2026.*", role="output")] == ["run2026.A.raw"]
    assert [d.name for d in dsm.find_datasets("run2026_*", limit=5)] == ["run2026_a_raw"]
    assert [d.name for d in dsm.find_datasets("run2026.*", limit=2)] == [
        "run2026.a.raw",
        "run2026.b.raw",
    ]
    assert dsm.find_datasets("run2026.[a].raw") == []

    gets = [r for r in server.requests[before:]]
    assert {(r.method, r.path) for r in gets} == {("GET", "/datasets")}
    assert gets[0].query == {"name": ["run2026.?.raw"], "role": ["input"], "limit": ["1000"]}
    assert gets[1].query == {"name": ["run2026.?.raw"], "limit": ["1000"]}  # role None: omitted
    assert gets[2].query["role"] == ["output"]
    assert gets[3].query["limit"] == ["5"]


@pytest.mark.parametrize(
    "pattern, kwargs",
    [
        ("", {}),
        ("*", {}),
        ("?**", {}),
        ("x" * 256, {}),
        ("run*", {"role": "sideways"}),
        ("run*", {"limit": 0}),
        ("run*", {"limit": 10_001}),
    ],
)
def test_find_datasets_refuses_bad_arguments_before_any_request(dsm, server, pattern, kwargs):
    with pytest.raises(ValidationFailed):
        dsm.find_datasets(pattern, **kwargs)
    assert server.count() == 0


def test_find_datasets_is_retried_like_every_get(dsm, server, sleeps):
    dsm.register_dataset("run.1")
    server.inject("status", times=2, status=503, match="/datasets")
    assert [d.name for d in dsm.find_datasets("run.*")] == ["run.1"]
    assert server.count("GET", "/datasets") == 3
    assert sleeps.delays == [BACKOFF, 2 * BACKOFF]


def _ds(name, role="input", **extra):
    return {
        "uid": str(uuid.uuid4()),
        "name": name,
        "role": role,
        "state": "open",
        "file_count": 0,
        "total_size": 0,
        **extra,
    }


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"<html>oops</html>", "not JSON"),
        ([_ds("run.1")], "a body that is not a JSON object"),
        ({"results": []}, "missing field 'datasets'"),
        ({"datasets": {"run.1": _ds("run.1")}}, "'datasets' is not a list"),
        ({"datasets": [{"name": "run.1"}]}, "missing field 'uid'"),
        ({"datasets": [_ds("run.1", state="ajar")]}, "'state' is not one of"),
        ({"datasets": [_ds("run.1"), _ds("other.1")]}, "'other.1', which does not match"),
        ({"datasets": [_ds("run.1", role="output")]}, "role 'output', not 'input'"),
        ({"datasets": [_ds("run.2"), _ds("run.1")]}, "out of name order"),
        ({"datasets": [_ds("run.1"), _ds("run.1")]}, "out of name order"),
        ({"datasets": [_ds("run.1"), _ds("run.2"), _ds("run.3")]}, "3 datasets for a limit of 2"),
    ],
)
def test_a_nonsense_selection_is_a_dsm_error(dsm, server, payload, message):
    server.inject("body", status=200, payload=payload)
    with pytest.raises(DSMError, match=message) as exc:
        dsm.find_datasets("run.?", limit=2)
    assert "GET /datasets" in str(exc.value.detail)
    assert server.count() == 1  # a nonsense answer is not retried


def test_a_400_from_the_dsm_on_a_selection_is_validation_failed(dsm, server):
    server.inject(
        "body", status=400, payload={"error": "validation_failed", "detail": {"name": ["no"]}}
    )
    with pytest.raises(ValidationFailed) as exc:
        dsm.find_datasets("run.*")
    assert exc.value.detail == {"name": ["no"]}


# --- 4xx mapping ----------------------------------------------------------------------------


def test_unknown_dataset_is_not_found(dsm, server, sleeps):
    with pytest.raises(NotFound, match="does not exist"):
        dsm.get_dataset(uuid.uuid4())
    with pytest.raises(NotFound):
        dsm.register_files(uuid.uuid4(), specs(1))
    assert server.count() == 2 and sleeps.delays == []  # a 4xx is not retried


def test_closed_dataset_is_dataset_closed(dsm, dataset):
    dsm.close_dataset(dataset.uid)
    with pytest.raises(DatasetClosed) as exc:
        dsm.register_files(dataset.uid, specs(2))
    assert "closed" in str(exc.value.detail)


def test_a_name_clash_is_a_plain_conflict(dsm, dataset):
    dsm.register_files(dataset.uid, specs(1))
    with pytest.raises(Conflict) as exc:
        dsm.register_files(dataset.uid, specs(1))
    assert not isinstance(exc.value, DatasetClosed)
    with pytest.raises(Conflict):
        dsm.register_dataset(dataset.name)


def test_bad_input_is_validation_failed_with_the_dsm_detail(dsm, dataset):
    with pytest.raises(ValidationFailed) as exc:
        dsm.register_dataset("x", role="sideways")
    assert exc.value.detail == {"role": ["Must be one of ('input', 'output')."]}
    with pytest.raises(ValidationFailed):
        dsm.register_files(dataset.uid, [{"name": "a.root", "size": -1}])


def test_bad_arguments_are_refused_before_any_request(dsm, server, dataset):
    n = server.count()
    with pytest.raises(ValidationFailed):
        dsm.list_files(dataset.uid, limit=0)
    with pytest.raises(ValidationFailed):
        dsm.register_files(dataset.uid, [*specs(1), "not-an-object"])
    assert server.count() == n


@pytest.mark.parametrize(
    "status, payload, error",
    [
        (409, {"error": "dataset_closed", "detail": "closed"}, DatasetClosed),
        (409, {"error": "name_taken", "detail": "taken"}, Conflict),
        (409, b"plain text conflict", Conflict),
        (422, {"error": "unprocessable", "detail": {"size": ["bad"]}}, ValidationFailed),
        (404, b"", NotFound),
        (403, {"error": "permission_denied", "detail": "no"}, DSMError),
        (418, {"error": "teapot", "detail": "short and stout"}, DSMError),
        (302, b"", DSMError),  # redirects are not followed (a POST would turn into a GET)
    ],
)
def test_error_answers_map_to_wms_exceptions(dsm, server, status, payload, error):
    server.inject("body", status=status, payload=payload)
    with pytest.raises(error) as exc:
        dsm.get_dataset(uuid.uuid4())
    assert type(exc.value) is error
    assert server.count() == 1


# --- retries --------------------------------------------------------------------------------


def test_5xx_answers_are_retried_until_success(dsm, server, sleeps):
    server.inject("status", times=2, status=503)
    info = dsm.register_dataset("data.retried")
    assert info.name == "data.retried"
    assert server.count("POST", "/datasets") == 3
    assert sleeps.delays == [BACKOFF, 2 * BACKOFF]  # exponential backoff


def test_always_5xx_is_a_dsm_error_after_the_retry_budget(dsm, server, sleeps):
    server.inject("status", times=math.inf, status=500)
    with pytest.raises(DSMError, match=r"after 4 attempt\(s\): HTTP 500") as exc:
        dsm.get_dataset(uuid.uuid4())
    assert exc.value.status == 502 and exc.value.code == "dsm_error"
    assert server.count() == RETRIES + 1
    assert sleeps.delays == [BACKOFF, 2 * BACKOFF, 4 * BACKOFF]


def test_429_is_retried(dsm, server):
    server.inject("status", times=1, status=429)
    assert dsm.register_dataset("data.throttled").name == "data.throttled"
    assert server.count() == 2


def test_backoff_is_capped(server, sleeps):
    with make_client(server.url, sleeps, retries=4, backoff=1.0, backoff_max=0.02) as client:
        server.inject("status", times=math.inf)
        with pytest.raises(DSMError):
            client.get_dataset(uuid.uuid4())
    assert sleeps.delays == [0.02] * 4


def test_zero_retries_means_one_attempt(server, sleeps):
    with make_client(server.url, sleeps, retries=0) as client:
        server.inject("status", times=math.inf)
        with pytest.raises(DSMError, match=r"after 1 attempt"):
            client.get_dataset(uuid.uuid4())
    assert server.count() == 1 and sleeps.delays == []


def test_a_slow_answer_is_retried_then_succeeds(dsm, server, dataset):
    server.inject("slow", times=1, delay=5 * READ_TIMEOUT)
    assert dsm.get_dataset(dataset.uid) == dataset
    assert server.count("GET") == 2


def test_always_slow_is_a_dsm_error_after_the_retry_budget(dsm, server, dataset):
    server.inject("slow", times=math.inf, delay=5)
    started = time.monotonic()
    with pytest.raises(DSMError, match="ReadTimeout"):
        dsm.get_dataset(dataset.uid)
    elapsed = time.monotonic() - started
    assert server.count("GET") == RETRIES + 1
    # 4 read timeouts and 3 short sleeps, not 4 x 5 s of waiting.
    assert (RETRIES + 1) * READ_TIMEOUT <= elapsed < 3.0


def test_a_dropped_connection_is_retried(dsm, server, dataset):
    server.inject("drop", times=2)
    assert dsm.get_dataset(dataset.uid) == dataset
    assert server.count("GET") == 3


def test_nothing_listening_is_a_dsm_error_after_retries(sleeps):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now: connection refused.
    with (
        make_client(f"http://127.0.0.1:{port}", sleeps) as client,
        pytest.raises(DSMError, match="ConnectionError"),
    ):
        client.get_dataset(uuid.uuid4())
    assert len(sleeps.delays) == RETRIES


def test_a_retried_write_is_applied_once_thanks_to_the_idempotency_key(dsm, server, dataset):
    # The DSM applies the write, then answers too late: the client times out and retries.
    server.inject("slow_after", times=1, delay=5 * READ_TIMEOUT, match="/files")
    infos = dsm.register_files(dataset.uid, specs(5))
    posts = [r for r in server.requests if r.method == "POST" and r.path.endswith("/files")]
    assert len(posts) == 2
    keys = {p.headers["Idempotency-Key"] for p in posts}
    assert len(keys) == 1  # the same key on the retry
    assert len(server.datasets[str(dataset.uid)].files) == 5  # applied once, not twice
    assert [f.name for f in infos] == [s["name"] for s in specs(5)]
    assert dsm.get_dataset(dataset.uid).file_count == 5


def test_each_call_gets_its_own_idempotency_key(dsm, server):
    dsm.register_dataset("k.1")
    dsm.register_dataset("k.2")
    keys = [r.headers["Idempotency-Key"] for r in server.requests]
    assert len(set(keys)) == 2


# --- malformed answers ----------------------------------------------------------------------


def test_malformed_json_is_a_dsm_error(dsm, server):
    server.inject("body", status=200, payload=b"{not json")
    with pytest.raises(DSMError, match="not JSON"):
        dsm.get_dataset(uuid.uuid4())
    assert server.count() == 1


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"name": "x", "role": "input", "state": "open"}, "missing field 'uid'"),
        (
            {
                "uid": "not-a-uuid",
                "name": "x",
                "role": "input",
                "state": "open",
                "file_count": 0,
                "total_size": 0,
            },
            "uid is not a UUID",
        ),
        (
            {
                "uid": str(uuid.uuid4()),
                "name": "x",
                "role": "input",
                "state": "half-open",
                "file_count": 0,
                "total_size": 0,
            },
            "'state' is not one of",
        ),
        (
            {
                "uid": str(uuid.uuid4()),
                "name": "x",
                "role": "input",
                "state": "open",
                "file_count": "3",
                "total_size": 0,
            },
            "'file_count' is not a int",
        ),
        ([1, 2, 3], "not a JSON object"),
    ],
)
def test_a_dataset_body_missing_or_mangling_fields_is_a_dsm_error(dsm, server, payload, message):
    server.inject("body", status=200, payload=payload)
    with pytest.raises(DSMError, match=message) as exc:
        dsm.get_dataset(uuid.uuid4())
    assert "GET /datasets/" in str(exc.value.detail)


def test_a_file_page_missing_fields_is_a_dsm_error(dsm, server, dataset):
    server.inject("body", status=200, payload={"files": []})
    with pytest.raises(DSMError, match="next_cursor"):
        dsm.list_files(dataset.uid)
    server.inject(
        "body", status=200, payload={"files": [{"id": 1, "name": "a"}], "next_cursor": None}
    )
    with pytest.raises(DSMError, match="missing field 'size'"):
        dsm.list_files(dataset.uid)
    server.inject("body", status=200, payload={"next_cursor": None})
    with pytest.raises(DSMError, match="missing field 'files'"):
        dsm.list_files(dataset.uid)


def test_a_short_registration_answer_is_a_dsm_error(dsm, server, dataset):
    server.inject("body", status=201, payload={"files": []}, match="/files")
    with pytest.raises(DSMError, match="0 files for the 2 registered"):
        dsm.register_files(dataset.uid, specs(2))


def test_a_cursor_that_does_not_advance_stops_iter_files(dsm, server, dataset):
    dsm.register_files(dataset.uid, specs(3))
    page = {"files": [], "next_cursor": 1}
    server.inject("body", times=2, status=200, payload=page)
    with pytest.raises(DSMError, match="did not advance"):
        list(iter_files(dsm, dataset.uid, limit=2))


# --- both backends, one behaviour -----------------------------------------------------------


@pytest.mark.django_db
def test_local_and_http_backends_answer_alike(dsm, settings):
    settings.WMS_OUTPUT_ROOT = "root://eos.example.org//data"  # where the output's files are
    local = LocalDSMClient()
    results = {}
    for name, client in (("local", local), ("http", dsm)):
        uid = uuid.UUID(int=42)
        ds = client.register_dataset("same.dataset", role="output", uid=uid)
        files = client.register_files(uid, specs(5, size=7))
        page = client.list_files(uid, limit=2)
        rest = client.list_files(uid, after=page.next_cursor, limit=10)
        closed = client.close_dataset(uid)
        with pytest.raises(DatasetClosed):
            client.register_files(uid, specs(1, prefix="late"))
        with pytest.raises(NotFound):
            client.get_dataset(uuid.UUID(int=7))
        with pytest.raises(Conflict):
            client.register_dataset("same.dataset")
        for other, role in [("same.b", "input"), ("same_a", "output"), ("same.a", "input")]:
            client.register_dataset(other, role=role, uid=uuid.uuid5(uid, other))
        found = {
            pattern: client.find_datasets(pattern, role=role)
            for pattern, role in [("same.*", "input"), ("same?*", None), ("same.a", None)]
        }
        with pytest.raises(ValidationFailed) as refused:
            client.find_datasets("**", role="x", limit=0)
        results[name] = {
            "dataset": ds,
            "closed": closed,
            "files": [(f.name, f.size, f.check_sum, f.url) for f in files],
            "pages": [
                [f.name for f in page.files],
                page.next_cursor == page.files[-1].id,
                [f.name for f in rest.files],
                rest.next_cursor,
            ],
            "types": {type(ds), type(closed), type(page), *map(type, files)},
            "found": found,
            "refused": refused.value.detail,
        }
    assert results["local"] == results["http"]
    assert results["http"]["types"] == {DatasetInfo, FilePage, FileInfo}
    assert results["http"]["closed"].file_count == 5
    found = results["local"]["found"]
    assert [d.name for d in found["same?*"]] == ["same.a", "same.b", "same.dataset", "same_a"]
    assert [d.name for d in found["same.*"]] == ["same.a", "same.b"]
    assert set(results["local"]["refused"]) == {"pattern", "role", "limit"}
