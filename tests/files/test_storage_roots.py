"""File URLs registered in an input dataset lie under an allowed storage root
(``WMS_STORAGE_ROOTS``): the API, the admin, the local and the http DSM clients refuse any
other with a 400 naming the field, and register nothing."""

from __future__ import annotations

import pytest

from files.dsm.http import HTTPDSMClient
from files.dsm.local import LocalDSMClient
from files.models import Dataset, DatasetEntry
from tests.factories import DatasetFactory
from wms.exceptions import ValidationFailed

pytestmark = pytest.mark.django_db

OUTSIDE = [
    "file:///etc/shadow",
    "/etc/shadow",
    "file:///data/../etc/shadow",
    "file:///data/%2e%2e/etc/shadow",
    "file:///data%2F..%2Fetc/shadow",
    "file:///database/x.root",  # starts like the root file:///data, is not under it
    "file://otherhost/data/x.root",
    "root://eos.example.org//datax/y",
    "https://example.org/data/x",
    "file:///data/x?y",
    "data/x.root",
]


def entries(ds):
    ds.refresh_from_db()
    return (DatasetEntry.objects.filter(dataset=ds).count(), ds.file_count, ds.total_size)


@pytest.mark.parametrize("url", OUTSIDE)
def test_the_api_refuses_a_file_outside_the_storage_roots(api_client, user, url):
    ds = DatasetFactory(owner=user)

    response = api_client.post(
        f"/api/v1/datasets/{ds.uid}/files/",
        {
            "files": [
                {"name": "ok.root", "size": 1, "url": "file:///data/ok.root"},
                {"name": "evil", "size": 1, "url": url},
            ]
        },
        format="json",
    )

    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["error"] == "validation_failed"
    assert list(body["detail"]) == ["files[1]"] and list(body["detail"]["files[1]"]) == ["url"]
    assert entries(ds) == (0, 0, 0)


def test_files_under_the_roots_are_registered(api_client, user):
    ds = DatasetFactory(owner=user)
    urls = [
        "file:///data/run1/a.root",
        "file://localhost/data//run1/./b.root",
        "root://EOS.example.org//data/c.root",
        "file:///x/d.root",
    ]
    response = api_client.post(
        f"/api/v1/datasets/{ds.uid}/files/",
        {"files": [{"name": f"f{i}", "url": u} for i, u in enumerate(urls)]},
        format="json",
    )

    assert response.status_code == 201, response.json()
    assert sorted(DatasetEntry.objects.filter(dataset=ds).values_list("url", flat=True)) == sorted(
        urls
    )


def test_no_storage_root_configured_admits_no_file(api_client, user, settings):
    settings.WMS_STORAGE_ROOTS = []
    ds = DatasetFactory(owner=user)
    response = api_client.post(
        f"/api/v1/datasets/{ds.uid}/files/",
        {"files": [{"name": "a", "url": "file:///data/a"}]},
        format="json",
    )
    assert response.status_code == 400
    assert entries(ds) == (0, 0, 0)


def test_the_local_client_refuses_with_the_field_named():
    ds = DatasetFactory()
    with pytest.raises(ValidationFailed) as refused:
        LocalDSMClient().register_files(ds.uid, [{"name": "s", "url": "file:///etc/shadow"}])
    assert list(refused.value.detail) == ["files[0]"]
    assert list(refused.value.detail["files[0]"]) == ["url"]
    assert entries(ds) == (0, 0, 0)


def test_the_http_client_refuses_before_sending_anything():
    # nothing listens on port 1: a request would end in DSMError, not ValidationFailed
    client = HTTPDSMClient(
        "http://127.0.0.1:1",
        retries=0,
        url_roots=("file:///data",),
    )
    with pytest.raises(ValidationFailed) as refused:
        client.register_files(
            "00000000-0000-0000-0000-000000000001",
            [{"name": "a", "url": "file:///data/a"}, {"name": "s", "url": "file:///etc/shadow"}],
        )
    assert list(refused.value.detail) == ["files[1]"]


def test_the_admin_refuses_an_entry_outside_the_roots(admin_client_logged):
    ds = DatasetFactory()
    response = admin_client_logged.post(
        "/admin/files/datasetentry/add/",
        {
            "dataset": ds.pk,
            "name": "shadow",
            "size": 0,
            "check_sum": "",
            "url": "file:///etc/shadow",
        },
    )

    assert response.status_code == 200  # the form again, with the field's error
    assert "is not under an allowed storage root" in response.content.decode()
    assert entries(ds) == (0, 0, 0)
    assert not DatasetEntry.objects.filter(url="file:///etc/shadow").exists()


def test_an_output_dataset_s_files_lie_in_the_output_root():
    out = DatasetFactory(role="output")
    with pytest.raises(ValidationFailed):
        LocalDSMClient().register_files(out.uid, [{"name": "a", "url": "file:///data/a"}])
    LocalDSMClient().register_files(out.uid, [{"name": "a", "url": "file:///out/u/t/a"}])
    assert Dataset.objects.get(pk=out.pk).file_count == 1
