"""The DSM catalogue and FILE_DAT admin: datasets registered and closed through services."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from files import services
from files.models import Dataset, DatasetEntry, DatasetState, DatasetTransition, File
from tests.factories import DatasetEntryFactory, DatasetFactory, FileFactory, UserFactory

pytestmark = pytest.mark.django_db

DATASETS = reverse("admin:files_dataset_changelist")


def messages_of(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def close_action(client, datasets):
    return client.post(
        DATASETS,
        {"action": "close_datasets", "_selected_action": [d.pk for d in datasets]},
        follow=True,
    )


def _queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(ctx.captured_queries), response


# --- pages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("dataset", lambda: DatasetFactory(owner=UserFactory())),
        ("datasetentry", lambda: DatasetEntryFactory()),
        ("file", lambda: FileFactory(dataset=DatasetFactory(), entry=DatasetEntryFactory())),
    ],
)
def test_changelists_render_without_n_plus_one_and_change_pages_render(
    admin_client_logged, name, make
):
    url = reverse(f"admin:files_{name}_changelist")
    first = make()
    one, _ = _queries(admin_client_logged, url)
    for _ in range(5):
        make()
    six, response = _queries(admin_client_logged, url)
    assert len(response.context["cl"].result_list) == 6
    assert six == one
    page = admin_client_logged.get(reverse(f"admin:files_{name}_change", args=[first.pk]))
    assert page.status_code == 200


def test_dataset_change_page_is_view_only_with_transitions(admin_client_logged):
    ds = DatasetFactory()
    services.dataset_close(dataset=ds, source="api", reason="all files in")

    response = admin_client_logged.get(reverse("admin:files_dataset_change", args=[ds.pk]))

    assert response.status_code == 200
    assert not response.context["has_change_permission"]
    assert response.context["adminform"].form.fields == {}
    html = response.content.decode()
    assert "all files in" in html
    assert 'name="state"' not in html
    assert f"?dataset__id__exact={ds.pk}" in html  # link to its catalogue entries


def test_dataset_state_cannot_be_posted(admin_client_logged):
    ds = DatasetFactory()
    admin_client_logged.post(
        reverse("admin:files_dataset_change", args=[ds.pk]), {"state": "closed", "name": "x"}
    )
    ds.refresh_from_db()
    assert ds.state == DatasetState.OPEN and ds.name != "x"
    assert not DatasetTransition.objects.filter(subject=ds).exists()


def test_transition_changelist_renders(admin_client_logged):
    ds = DatasetFactory()
    services.dataset_close(dataset=ds, source="api")
    tr = DatasetTransition.objects.get(subject=ds)
    assert (
        admin_client_logged.get(reverse("admin:files_datasettransition_changelist")).status_code
        == 200
    )
    assert (
        admin_client_logged.get(
            reverse("admin:files_datasettransition_change", args=[tr.pk])
        ).status_code
        == 200
    )


def test_files_are_read_only(admin_client_logged):
    f = FileFactory()
    assert admin_client_logged.get(reverse("admin:files_file_add")).status_code == 403
    assert (
        admin_client_logged.get(reverse("admin:files_file_delete", args=[f.pk])).status_code == 403
    )
    page = admin_client_logged.get(reverse("admin:files_file_change", args=[f.pk]))
    assert page.context["adminform"].form.fields == {}


# --- writes through the services ---------------------------------------------------------------


def test_add_dataset_registers_it_through_the_service(admin_client_logged, admin_user):
    response = admin_client_logged.post(
        reverse("admin:files_dataset_add"),
        {"name": "  data24.physics_main  ", "role": "input", "location": "root://eos/x"},
    )
    assert response.status_code == 302
    ds = Dataset.objects.get(name="data24.physics_main")  # dataset_register strips the name
    assert ds.state == DatasetState.OPEN and ds.location == "root://eos/x"
    assert ds.owner == admin_user  # whoever registers it owns it

    page = admin_client_logged.get(reverse("admin:files_dataset_change", args=[ds.pk]))
    assert "owner" in page.context["adminform"].readonly_fields
    assert admin_user.username in page.content.decode()


def test_add_dataset_with_a_taken_name_is_a_form_error(admin_client_logged):
    DatasetFactory(name="taken")
    response = admin_client_logged.post(
        reverse("admin:files_dataset_add"), {"name": "taken", "role": "input", "location": ""}
    )
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    assert Dataset.objects.filter(name="taken").count() == 1


def test_add_entry_goes_through_dataset_add_files(admin_client_logged):
    ds = DatasetFactory()
    response = admin_client_logged.post(
        reverse("admin:files_datasetentry_add"),
        {
            "dataset": ds.pk,
            "name": "evts.000001.root",
            "size": "4096",
            "check_sum": "adler32:0a1b2c3d",
            "url": "",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    entry = DatasetEntry.objects.get(dataset=ds, name="evts.000001.root")
    assert entry.size == 4096
    ds.refresh_from_db()
    assert (ds.file_count, ds.total_size) == (1, 4096)  # the service keeps the totals


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"check_sum": "crc:xyz"}, "check_sum"), ({"closed": True}, "dataset")],
)
def test_add_entry_refuses_bad_input(admin_client_logged, changes, field):
    ds = DatasetFactory()
    if changes.pop("closed", False):
        services.dataset_close(dataset=ds, source="api")
    data = {"dataset": ds.pk, "name": "e.root", "size": "1", "check_sum": "", "url": ""}
    data.update(changes)
    response = admin_client_logged.post(reverse("admin:files_datasetentry_add"), data)
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not DatasetEntry.objects.filter(dataset=ds).exists()


def test_entry_autocomplete_offers_open_datasets_only(admin_client_logged):
    open_ds = DatasetFactory(name="auto-open")
    closed = DatasetFactory(name="auto-closed")
    services.dataset_close(dataset=closed, source="api")
    response = admin_client_logged.get(
        reverse("admin:autocomplete"),
        {
            "term": "auto",
            "app_label": "files",
            "model_name": "datasetentry",
            "field_name": "dataset",
        },
    )
    assert response.status_code == 200
    assert [r["id"] for r in response.json()["results"]] == [str(open_ds.pk)]


# --- the close action --------------------------------------------------------------------------


def test_close_action_closes_through_the_service(admin_client_logged, admin_user):
    a, b = DatasetFactory(), DatasetFactory()

    response = close_action(admin_client_logged, [a, b])

    assert ("success", "2 datasets closed.") in messages_of(response)
    for ds in (a, b):
        ds.refresh_from_db()
        assert ds.state == DatasetState.CLOSED and ds.closed_at is not None
        tr = DatasetTransition.objects.get(subject=ds)
        assert (tr.from_state, tr.to_state, tr.source) == ("open", "closed", "admin")
        assert admin_user.username in tr.reason


def test_closing_a_closed_dataset_again_changes_nothing(admin_client_logged):
    ds = DatasetFactory()
    services.dataset_close(dataset=ds, source="api")
    closed_at = Dataset.objects.get(pk=ds.pk).closed_at

    response = close_action(admin_client_logged, [ds])

    assert ("warning", "1 dataset already closed.") in messages_of(response)
    assert DatasetTransition.objects.filter(subject=ds).count() == 1
    assert Dataset.objects.get(pk=ds.pk).closed_at == closed_at


def test_close_action_refuses_the_output_of_a_task_that_may_still_run(admin_client_logged, user):
    """The output of an active task stays open (its jobs still write there): a message, no
    close. Once the task ended, an operator may close it by hand."""
    from tasks.create import task_create
    from tasks.lifecycle import task_cancel

    task = task_create(owner=user, executable="x", data_in_uid=DatasetFactory().uid, name="t")
    output = Dataset.objects.get(uid=task.data_out_uid)

    response = close_action(admin_client_logged, [output])

    errors = [text for level, text in messages_of(response) if level == "error"]
    assert len(errors) == 1 and f"output dataset of task {task.pk}" in errors[0]
    assert Dataset.objects.get(pk=output.pk).state == DatasetState.OPEN
    assert not DatasetTransition.objects.filter(subject=output).exists()

    task_cancel(task_id=task.pk, source="api")
    output.refresh_from_db()
    assert output.state == DatasetState.OPEN  # no finalizer runs in this test
    response = close_action(admin_client_logged, [output])
    assert ("success", "1 dataset closed.") in messages_of(response)
    assert Dataset.objects.get(pk=output.pk).state == DatasetState.CLOSED


def test_file_changelist_links_job_task_and_dataset(admin_client_logged):
    f = FileFactory(dataset=DatasetFactory())
    html = admin_client_logged.get(reverse("admin:files_file_changelist")).content.decode()
    assert reverse("admin:jobs_job_change", args=[f.job_id]) in html
    assert reverse("admin:tasks_task_change", args=[f.task_id]) in html
    assert reverse("admin:files_dataset_change", args=[f.dataset_id]) in html
    assert File.objects.count() == 1
