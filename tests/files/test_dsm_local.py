"""The ``local`` DSM backend on the real Postgres: every method, through files.services."""

import re
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured

from files.dsm import (
    MAX_FIND,
    DatasetInfo,
    DatasetSpec,
    DSMClient,
    FileInfo,
    FilePage,
    get_dsm,
    iter_files,
)
from files.dsm.http import HTTPDSMClient
from files.dsm.local import LocalDSMClient
from files.models import Dataset, DatasetEntry, DatasetTransition
from wms import checksums
from wms.exceptions import Conflict, DatasetClosed, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


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


@pytest.fixture
def dsm():
    with get_dsm("local") as client:
        yield client


# --- factory --------------------------------------------------------------------------------


def test_get_dsm_defaults_to_local(settings):
    assert settings.WMS_DSM_BACKEND == "local"
    client = get_dsm()
    assert isinstance(client, LocalDSMClient)
    assert isinstance(client, DSMClient)


def test_get_dsm_builds_the_http_client_from_settings(settings):
    settings.WMS_DSM_BACKEND = "http"
    settings.WMS_DSM_URL = "http://dsm.example.org/api/"
    settings.WMS_DSM_TOKEN = "t0ken"
    settings.WMS_DSM_TIMEOUT = (1.5, 7.0)
    settings.WMS_DSM_RETRIES = 5
    settings.WMS_DSM_BACKOFF = 0.25
    with get_dsm() as client:
        assert isinstance(client, HTTPDSMClient)
        assert isinstance(client, DSMClient)
        assert client.base_url == "http://dsm.example.org/api"
        assert client.timeout == (1.5, 7.0)
        assert (client.retries, client.backoff) == (5, 0.25)
        assert client.session.headers["Authorization"] == "Bearer t0ken"


def test_get_dsm_refuses_an_unknown_backend_or_http_without_url(settings):
    settings.WMS_DSM_BACKEND = "ftp"
    with pytest.raises(ImproperlyConfigured, match="WMS_DSM_BACKEND"):
        get_dsm()
    settings.WMS_DSM_BACKEND = "http"
    settings.WMS_DSM_URL = ""
    with pytest.raises(ImproperlyConfigured, match="WMS_DSM_URL"):
        get_dsm()


# --- datasets -------------------------------------------------------------------------------


def test_register_dataset_returns_plain_info_and_writes_the_catalogue(dsm):
    uid = uuid.uuid4()
    info = dsm.register_dataset(
        "mc.run00001.evgen", role="output", uid=str(uid), location="root://eos//mc"
    )
    assert info == DatasetInfo(
        uid=uid,
        name="mc.run00001.evgen",
        role="output",
        state="open",
        file_count=0,
        total_size=0,
        location="root://eos//mc",
    )
    assert type(info) is DatasetInfo and info.is_open
    row = Dataset.objects.get(uid=uid)
    assert (row.name, row.role, row.state) == ("mc.run00001.evgen", "output", "open")


def test_register_dataset_refuses_a_taken_name_or_uid_and_bad_input(dsm):
    first = dsm.register_dataset("data.a")
    with pytest.raises(Conflict):
        dsm.register_dataset("data.a")
    with pytest.raises(Conflict):
        dsm.register_dataset("data.b", uid=first.uid)
    with pytest.raises(ValidationFailed):
        dsm.register_dataset("data.c", role="sideways")
    with pytest.raises(ValidationFailed):
        dsm.register_dataset("data.d", uid="not-a-uuid")
    with pytest.raises(ValidationFailed):
        dsm.register_dataset("   ")
    assert list(Dataset.objects.values_list("name", flat=True)) == ["data.a"]


def test_register_datasets_creates_all_in_order(dsm):
    out_uid = uuid.uuid4()
    infos = dsm.register_datasets(
        [
            {"name": "task7.input"},
            DatasetSpec(name="task7.output", role="output", uid=out_uid),
            {"name": "task7.log", "role": "output", "location": "root://eos//logs"},
        ]
    )
    assert [i.name for i in infos] == ["task7.input", "task7.output", "task7.log"]
    assert [i.role for i in infos] == ["input", "output", "output"]
    assert infos[1].uid == out_uid and infos[2].location == "root://eos//logs"
    assert all(isinstance(i, DatasetInfo) and i.state == "open" for i in infos)
    assert Dataset.objects.count() == 3


@pytest.mark.parametrize(
    "batch, error",
    [
        ([{"name": "new.1"}, {"name": "taken"}], Conflict),  # clashes with the database
        ([{"name": "new.1"}, {"name": "new.1"}], ValidationFailed),  # repeats in the request
        ([{"name": "new.1"}, {"name": "new.2", "role": "bad"}], ValidationFailed),
        ([{"name": "new.1"}, {"name": "new.2", "uid": "nope"}], ValidationFailed),
        ([{"name": "new.1"}, {"name": "new.2", "colour": "red"}], ValidationFailed),
        ([], ValidationFailed),
    ],
)
def test_register_datasets_is_all_or_none(dsm, batch, error):
    dsm.register_dataset("taken")
    with pytest.raises(error):
        dsm.register_datasets(batch)
    assert list(Dataset.objects.values_list("name", flat=True)) == ["taken"]


def test_register_datasets_reports_which_spec_is_wrong(dsm):
    with pytest.raises(ValidationFailed) as exc:
        dsm.register_datasets([{"name": "ok"}, {"name": "bad", "role": "x"}])
    assert "datasets[1]" in exc.value.detail


def test_get_dataset(dsm):
    created = dsm.register_dataset("data.get")
    dsm.register_files(created.uid, specs(3, size=100))
    info = dsm.get_dataset(str(created.uid))
    assert info == DatasetInfo(
        uid=created.uid,
        name="data.get",
        role="input",
        state="open",
        file_count=3,
        total_size=300,
    )


@pytest.mark.parametrize("uid", [uuid.uuid4(), str(uuid.uuid4()), "not-a-uuid", ""])
def test_unknown_or_malformed_uid_is_not_found_everywhere(dsm, uid):
    with pytest.raises(NotFound):
        dsm.get_dataset(uid)
    with pytest.raises(NotFound):
        dsm.list_files(uid)
    with pytest.raises(NotFound):
        dsm.register_files(uid, specs(1))
    with pytest.raises(NotFound):
        dsm.close_dataset(uid)


def test_close_dataset_is_idempotent_and_recorded_once(dsm):
    ds = dsm.register_dataset("data.close")
    closed = dsm.close_dataset(ds.uid, source="executor", reason="task 7 finished")
    assert closed.state == "closed" and not closed.is_open
    again = dsm.close_dataset(ds.uid, source="executor")
    assert again == closed
    transitions = list(DatasetTransition.objects.filter(subject__uid=ds.uid))
    assert len(transitions) == 1
    t = transitions[0]
    assert (t.from_state, t.to_state, t.source, t.reason) == (
        "open",
        "closed",
        "executor",
        "task 7 finished",
    )
    assert Dataset.objects.get(uid=ds.uid).closed_at is not None


# --- files ----------------------------------------------------------------------------------


def test_register_files_returns_file_infos_and_updates_counters(dsm):
    ds = dsm.register_dataset("data.files")
    wanted = specs(4, size=250)
    infos = dsm.register_files(ds.uid, wanted)
    assert all(type(f) is FileInfo for f in infos)
    assert [(f.name, f.size, f.check_sum, f.url) for f in infos] == [
        (w["name"], w["size"], w["check_sum"], w["url"]) for w in wanted
    ]
    ids = [f.id for f in infos]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert set(DatasetEntry.objects.filter(dataset__uid=ds.uid).values_list("pk", flat=True)) == (
        set(ids)
    )
    info = dsm.get_dataset(ds.uid)
    assert (info.file_count, info.total_size) == (4, 1000)


def test_closed_dataset_refuses_files_and_keeps_none(dsm):
    ds = dsm.register_dataset("data.closed")
    dsm.register_files(ds.uid, specs(2))
    dsm.close_dataset(ds.uid)
    with pytest.raises(DatasetClosed) as exc:
        dsm.register_files(ds.uid, specs(3, prefix="late"))
    assert exc.value.code == "dataset_closed" and exc.value.status == 409
    assert DatasetEntry.objects.filter(dataset__uid=ds.uid).count() == 2
    assert dsm.get_dataset(ds.uid).file_count == 2


def test_register_files_is_all_or_none(dsm):
    ds = dsm.register_dataset("data.atomic")
    dsm.register_files(ds.uid, specs(1, prefix="dup"))
    batch = specs(3, prefix="new") + specs(1, prefix="dup")  # the last one is already there
    with pytest.raises(Conflict):
        dsm.register_files(ds.uid, batch)
    bad = [*specs(2, prefix="ok"), {"name": "x.root", "size": 1, "check_sum": "crc:123"}]
    with pytest.raises(ValidationFailed):
        dsm.register_files(ds.uid, bad)
    with pytest.raises(ValidationFailed):
        dsm.register_files(ds.uid, [])
    with pytest.raises(ValidationFailed):
        dsm.register_files(ds.uid, [*specs(1, prefix="ok"), "not-an-object"])
    with pytest.raises(ValidationFailed):
        dsm.register_files(ds.uid, {"name": "a.root"})  # one file, not a list of them
    assert [f.name for f in dsm.list_files(ds.uid).files] == ["dup.000000.root"]
    assert dsm.get_dataset(ds.uid).file_count == 1


# --- paging ---------------------------------------------------------------------------------


def test_cursor_paging_returns_every_file_exactly_once(dsm, django_assert_num_queries):
    ds = dsm.register_dataset("data.big")
    registered = dsm.register_files(ds.uid, specs(2500))
    other = dsm.register_dataset("data.other")  # another dataset's entries interleave no page
    dsm.register_files(other.uid, specs(10, prefix="other"))

    pages: list[FilePage] = []
    cursor = None
    while True:
        with django_assert_num_queries(2):  # the dataset, then one page of entries
            page = dsm.list_files(ds.uid, after=cursor, limit=1000)
        pages.append(page)
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.files[-1].id
        cursor = page.next_cursor

    assert [len(p.files) for p in pages] == [1000, 1000, 500]
    seen = [f for p in pages for f in p.files]
    assert seen == registered  # same files, same order, each once
    assert len({f.id for f in seen}) == 2500
    assert all(not f.name.startswith("other") for f in seen)


def test_paging_ends_without_an_empty_page_and_resumes_after_new_files(dsm):
    ds = dsm.register_dataset("data.growing")
    dsm.register_files(ds.uid, specs(4))
    first = dsm.list_files(ds.uid, limit=2)
    second = dsm.list_files(ds.uid, after=first.next_cursor, limit=2)
    assert len(second.files) == 2 and second.next_cursor is None  # exactly 2 pages
    # The dataset is still open: more files arrive, and the walk resumes from the last id seen.
    late = dsm.register_files(ds.uid, specs(3, prefix="late"))
    resumed = dsm.list_files(ds.uid, after=second.files[-1].id, limit=10)
    assert resumed.files == late and resumed.next_cursor is None
    assert dsm.list_files(ds.uid, after=late[-1].id) == FilePage(files=[], next_cursor=None)


def test_iter_files_walks_the_whole_dataset(dsm):
    ds = dsm.register_dataset("data.iter")
    registered = dsm.register_files(ds.uid, specs(25))
    assert list(iter_files(dsm, ds.uid, limit=7)) == registered
    assert list(iter_files(dsm, ds.uid, after=registered[9].id, limit=7)) == registered[10:]


def test_empty_dataset_lists_no_files(dsm):
    ds = dsm.register_dataset("data.empty")
    assert dsm.list_files(ds.uid) == FilePage(files=[], next_cursor=None)


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": 10_001}, {"limit": "5"}, {"after": -1}, {"after": "12"}],
)
def test_list_files_refuses_bad_paging_arguments(dsm, kwargs):
    ds = dsm.register_dataset("data.args")
    with pytest.raises(ValidationFailed):
        dsm.list_files(ds.uid, **kwargs)


# --- find_datasets (a selection of datasets by name glob) -----------------------------------

# Names full of characters that are special to LIKE (% _ \), to regexes (. [ ] ( ) + ^ $ { } | \)
# or to neither, in both cases; registered in a shuffled order.
TRICKY = [
    "run2026.B.raw",
    "run2026.a.raw",
    "run2026Xa.raw",
    "run2026.a.raw.tmp",
    "run2026.ab.raw",
    "run2026..raw",
    "run2026_a_raw",
    "run2026%a%raw",
    "run2026[a].raw",
    "run2026a.raw",
    "RUN2026.a.raw",
    "run\\2026.a.raw",
    "run2026.(a)+.raw",
    "run2026.^a$.raw",
    "run2026.{1,2}|x.raw",
    "run 2026.a.raw",
    "run2026.é.raw",
    "run2026.a\nb.raw",
]

# What "run2026.*.raw" selects among them: "." is literal, "*" spans anything but the rest.
RUN_DOT_RAW = [
    "run2026.(a)+.raw",
    "run2026..raw",
    "run2026.B.raw",
    "run2026.^a$.raw",
    "run2026.a\nb.raw",
    "run2026.a.raw",
    "run2026.ab.raw",
    "run2026.{1,2}|x.raw",
    "run2026.é.raw",
]


def glob_reference(pattern, names):
    """The glob's meaning, spelt out with fnmatch-free Python (``fnmatch`` has ``[...]``)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return sorted(n for n in names if re.fullmatch(regex, n, re.DOTALL))


@pytest.fixture
def tricky(dsm):
    for name in TRICKY[1::2] + TRICKY[::2]:
        dsm.register_dataset(name)
    return TRICKY


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("run2026.*.raw", RUN_DOT_RAW),
        ("run2026.?.raw", ["run2026.B.raw", "run2026.a.raw", "run2026.é.raw"]),
        ("run2026.a.raw", ["run2026.a.raw"]),  # no wildcard: one name, whole
        ("run2026.a", []),  # the whole name, not a prefix
        (
            "*a.raw",
            [
                "RUN2026.a.raw",
                "run 2026.a.raw",
                "run2026.a.raw",
                "run2026Xa.raw",
                "run2026a.raw",
                "run\\2026.a.raw",
            ],
        ),
        ("run2026_a_raw", ["run2026_a_raw"]),  # _ is no LIKE wildcard
        ("run2026_*", ["run2026_a_raw"]),
        ("run2026%*", ["run2026%a%raw"]),  # nor is %
        ("run2026[a]*", ["run2026[a].raw"]),  # [ ] is no character class
        ("run2026[?]*", ["run2026[a].raw"]),
        ("run\\2026*", ["run\\2026.a.raw"]),  # \ is literal
        ("run2026.(a)+*", ["run2026.(a)+.raw"]),
        ("run2026.^a$*", ["run2026.^a$.raw"]),
        ("*{1,2}|x*", ["run2026.{1,2}|x.raw"]),
        ("RUN*", ["RUN2026.a.raw"]),  # case-sensitive
        ("run2026.A.raw", []),
        ("run2026.a?b.raw", ["run2026.a\nb.raw"]),  # ? is any one character, a newline too
        ("run2026.a*b.raw", ["run2026.a\nb.raw", "run2026.ab.raw"]),
        ("*.raw.tmp", ["run2026.a.raw.tmp"]),
        (
            "*2026.a*",
            [
                "RUN2026.a.raw",
                "run 2026.a.raw",
                "run2026.a\nb.raw",
                "run2026.a.raw",
                "run2026.a.raw.tmp",
                "run2026.ab.raw",
                "run\\2026.a.raw",
            ],
        ),
        ("run2026.a.raw*", ["run2026.a.raw", "run2026.a.raw.tmp"]),  # * may be empty
        ("run2026.**.raw", RUN_DOT_RAW),  # a run of stars is one star
    ],
)
def test_find_datasets_matches_a_glob_over_the_whole_name(dsm, tricky, pattern, expected):
    found = dsm.find_datasets(pattern)
    assert all(type(d) is DatasetInfo for d in found)
    names = [d.name for d in found]
    assert names == sorted(expected)
    assert names == glob_reference(pattern, tricky)


def test_find_datasets_agrees_with_the_glob_everywhere(dsm, tricky):
    patterns = ["*" + c + "*" for c in sorted(set("".join(tricky)))]
    patterns += ["r" + "?" * n + "*" for n in (1, 12, 13)] + ["*raw", "r*w", "*?.?a?*", "*\n*"]
    for pattern in patterns:
        names = [d.name for d in dsm.find_datasets(pattern)]
        assert names == glob_reference(pattern, tricky), pattern


def test_find_datasets_orders_by_code_point_and_limits(dsm):
    names = ["sel.b", "sel.B", "sel.a_z", "sel.a.z", "sel.aa", "sel.a-z", "sel.Z", "sel.~"]
    for name in names:
        dsm.register_dataset(name)
    found = [d.name for d in dsm.find_datasets("sel.*")]
    assert found == sorted(names)  # Python's order of str: code points, whatever the collation
    assert [d.name for d in dsm.find_datasets("sel.*", limit=3)] == sorted(names)[:3]
    assert [d.name for d in dsm.find_datasets("sel.*", limit=1)] == sorted(names)[:1]


def test_find_datasets_filters_by_role_or_not_and_ignores_the_state(dsm):
    a_in = dsm.register_dataset("sel.a.in")
    b_out = dsm.register_dataset("sel.b.out", role="output")
    c_in = dsm.close_dataset(dsm.register_dataset("sel.c.in").uid, reason="complete")
    assert dsm.find_datasets("sel.*") == [a_in, c_in]  # role="input" by default
    assert dsm.find_datasets("sel.*", role="output") == [b_out]
    assert dsm.find_datasets("sel.*", role=None) == [a_in, b_out, c_in]
    assert c_in.state == "closed" and dsm.find_datasets("sel.c.in") == [c_in]


def test_find_datasets_without_a_match_is_an_empty_list(dsm):
    dsm.register_dataset("sel.a")
    assert dsm.find_datasets("other.*") == []
    assert dsm.find_datasets("sel.a", role="output") == []


def test_find_datasets_is_one_query(dsm, django_assert_num_queries):
    for i in range(5):
        dsm.register_dataset(f"sel.{i}")
    with django_assert_num_queries(1):
        assert len(dsm.find_datasets("sel.?")) == 5


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"pattern": ""}, "pattern"),
        ({"pattern": "   "}, "pattern"),
        ({"pattern": "x" * 256}, "pattern"),
        ({"pattern": "*"}, "pattern"),
        ({"pattern": "**"}, "pattern"),
        ({"pattern": "?*"}, "pattern"),
        ({"pattern": "???"}, "pattern"),
        ({"pattern": "a\x00*"}, "pattern"),
        ({"pattern": None}, "pattern"),
        ({"pattern": b"run*"}, "pattern"),
        ({"pattern": "run*", "role": "sideways"}, "role"),
        ({"pattern": "run*", "role": ""}, "role"),
        ({"pattern": "run*", "limit": 0}, "limit"),
        ({"pattern": "run*", "limit": MAX_FIND + 1}, "limit"),
        ({"pattern": "run*", "limit": "5"}, "limit"),
        ({"pattern": "run*", "limit": True}, "limit"),
        ({"pattern": "run*", "limit": 2.0}, "limit"),
    ],
)
def test_find_datasets_refuses_bad_arguments(dsm, kwargs, field):
    dsm.register_dataset("run.1")
    pattern = kwargs.pop("pattern")
    with pytest.raises(ValidationFailed) as exc:
        dsm.find_datasets(pattern, **kwargs)
    assert list(exc.value.detail) == [field]


def test_find_datasets_reports_every_bad_argument_at_once(dsm):
    with pytest.raises(ValidationFailed) as exc:
        dsm.find_datasets("*", role="x", limit=0)
    assert set(exc.value.detail) == {"pattern", "role", "limit"}


def test_find_datasets_accepts_the_extremes(dsm):
    name = "x" * 255
    dsm.register_dataset(name)
    assert [d.name for d in dsm.find_datasets(name, limit=MAX_FIND)] == [name]
    assert [d.name for d in dsm.find_datasets("x" * 254 + "?")] == [name]
    assert [d.name for d in dsm.find_datasets("*x")] == [name]
