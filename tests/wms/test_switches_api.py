"""The global service switches through the API, and what they do to the splitter."""

from rest_framework.test import APIClient

from files.services import dataset_add_files, dataset_register
from jobs.models import Job
from tasks.splitter import split_all
from tests.factories import TaskFactory
from wms.models import Switch


def test_anyone_authenticated_reads_only_staff_switch(db, api_client, admin_user):
    resp = api_client.get("/api/v1/switches/")
    assert resp.status_code == 200
    assert {s["name"]: s["enabled"] for s in resp.json()} == {
        "splitter": True,
        "executor": True,
        "reaper": True,
        "finalizer": True,
    }
    resp = api_client.patch("/api/v1/switches/splitter/", {"enabled": False}, format="json")
    assert resp.status_code == 403 and resp.json()["error"] == "permission_denied"
    assert not Switch.objects.filter(enabled=False).exists()

    staff = APIClient()
    staff.force_authenticate(admin_user)
    resp = staff.patch("/api/v1/switches/splitter/", {"enabled": False}, format="json")
    assert resp.status_code == 200
    assert resp.json()["enabled"] is False and resp.json()["updated_by"] == admin_user.username
    assert Switch.objects.get(pk="splitter").enabled is False


def test_bad_input_is_400_and_unknown_service_404(db, admin_user):
    staff = APIClient()
    staff.force_authenticate(admin_user)
    resp = staff.patch("/api/v1/switches/executor/", {"enabled": "maybe"}, format="json")
    assert resp.status_code == 400 and "enabled" in resp.json()["detail"]
    resp = staff.patch("/api/v1/switches/executor/", {"enabled": False, "x": 1}, format="json")
    assert resp.status_code == 400 and "x" in resp.json()["detail"]
    assert staff.get("/api/v1/switches/sweeper/").status_code == 404
    assert not Switch.objects.filter(enabled=False).exists()


def test_switching_off_stops_the_next_cycle_and_on_resumes(db, admin_user):
    staff = APIClient()
    staff.force_authenticate(admin_user)
    ds = dataset_register(name="switch.ds")
    dataset_add_files(dataset=ds, files=[{"name": "a.root", "size": 1}])
    TaskFactory(data_in_uid=ds.uid)
    staff.patch("/api/v1/switches/splitter/", {"enabled": False}, format="json")
    assert split_all() == []
    assert Job.objects.count() == 0
    staff.patch("/api/v1/switches/splitter/", {"enabled": True}, format="json")
    assert sum(r.jobs for r in split_all()) == 1


def test_anonymous_is_401(db, anon_client):
    assert anon_client.get("/api/v1/switches/").status_code == 401
