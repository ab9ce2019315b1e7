"""The pilot admin: the token hash never shows; terminate and revoke go through the services."""

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs.models import JobState
from pilots import services
from pilots.models import Pilot, PilotState, PilotTransition
from tests.factories import JobFactory, PilotFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:pilots_pilot_changelist")


def messages_of(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def run_action(client, action, objs):
    return client.post(
        CHANGELIST, {"action": action, "_selected_action": [o.pk for o in objs]}, follow=True
    )


def _queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries), response


def test_changelist_renders_without_n_plus_one_and_counts_running_jobs(admin_client_logged):
    busy = PilotFactory()
    JobFactory.create_batch(2, pilot=busy, state=JobState.RUNNING)
    JobFactory(pilot=busy, state=JobState.FINISHED)
    one, _ = _queries(admin_client_logged, CHANGELIST)
    for _ in range(5):
        JobFactory(pilot=PilotFactory(), state=JobState.RUNNING)
    six, response = _queries(admin_client_logged, CHANGELIST)
    assert six == one
    running = {p.pk: p._running_jobs for p in response.context["cl"].result_list}
    assert running[busy.pk] == 2 and len(running) == 6


def test_pages_never_show_the_token_hash(admin_client_logged):
    pilot, token = services.pilot_register(hostname="wn001.cern.ch")
    services.pilot_transition(pilot_id=pilot.pk, target=PilotState.IDLE, source="system")
    pilot.refresh_from_db()
    assert pilot.token_hash

    for url in (CHANGELIST, reverse("admin:pilots_pilot_change", args=[pilot.pk])):
        response = admin_client_logged.get(url)
        assert response.status_code == 200
        html = response.content.decode()
        assert pilot.token_hash not in html and token not in html
        assert "token_hash" not in html
        assert ">set<" in html
    page = admin_client_logged.get(reverse("admin:pilots_pilot_change", args=[pilot.pk]))
    assert page.context["adminform"].form.fields == {}  # view-only: state is not editable
    inline = page.context["inline_admin_formsets"][0]
    assert inline.formset.model is PilotTransition and len(inline.formset.forms) == 1


def test_token_hash_cannot_be_searched_or_filtered(admin_client_logged):
    pilot = PilotFactory()
    by_search = admin_client_logged.get(CHANGELIST, {"q": pilot.token_hash})
    assert list(by_search.context["cl"].result_list) == []
    by_lookup = admin_client_logged.get(CHANGELIST, {"token_hash": pilot.token_hash})
    assert by_lookup.status_code == 400  # DisallowedModelAdminLookup


def test_pilots_cannot_be_added_or_deleted(admin_client_logged):
    pilot = PilotFactory()
    assert admin_client_logged.get(reverse("admin:pilots_pilot_add")).status_code == 403
    assert (
        admin_client_logged.get(reverse("admin:pilots_pilot_delete", args=[pilot.pk])).status_code
        == 403
    )
    tr_list = admin_client_logged.get(reverse("admin:pilots_pilottransition_changelist"))
    assert tr_list.status_code == 200


def test_terminate_action(admin_client_logged, admin_user):
    idle = PilotFactory(state=PilotState.IDLE)
    busy = PilotFactory(state=PilotState.BUSY)

    response = run_action(admin_client_logged, "terminate_pilots", [idle, busy])

    assert ("success", "2 pilots terminated.") in messages_of(response)
    for pilot in (idle, busy):
        pilot.refresh_from_db()
        assert pilot.state == PilotState.TERMINATED
        tr = PilotTransition.objects.get(subject=pilot)
        assert (tr.to_state, tr.source) == ("terminated", "admin")
        assert admin_user.username in tr.reason
    tr_page = admin_client_logged.get(reverse("admin:pilots_pilottransition_change", args=[tr.pk]))
    assert tr_page.status_code == 200


def test_terminate_a_lost_pilot_is_an_error_and_changes_nothing(admin_client_logged):
    lost = PilotFactory(state=PilotState.LOST)
    response = run_action(admin_client_logged, "terminate_pilots", [lost])
    msgs = messages_of(response)
    assert [level for level, _ in msgs] == ["error"]
    assert Pilot.objects.get(pk=lost.pk).state == PilotState.LOST
    assert not PilotTransition.objects.filter(subject=lost).exists()


def test_revoke_token_action(admin_client_logged, admin_user):
    pilot = PilotFactory()

    response = run_action(admin_client_logged, "revoke_tokens", [pilot])

    assert ("success", "1 pilot had their token revoked.") in messages_of(response)
    pilot.refresh_from_db()
    assert pilot.token_hash is None and pilot.token_revoked_at is not None
    entry = LogEntry.objects.get(object_id=str(pilot.pk), user=admin_user)
    assert admin_user.username in entry.get_change_message()
    page = admin_client_logged.get(reverse("admin:pilots_pilot_change", args=[pilot.pk]))
    assert ">revoked<" in page.content.decode()

    # again: nothing left to revoke, the first revocation time is kept
    revoked_at = pilot.token_revoked_at
    response = run_action(admin_client_logged, "revoke_tokens", [pilot])
    assert ("warning", "1 pilot had no token left to revoke.") in messages_of(response)
    assert Pilot.objects.get(pk=pilot.pk).token_revoked_at == revoked_at


def test_token_filter(admin_client_logged):
    kept, revoked = PilotFactory(), PilotFactory()
    services.pilot_revoke_token(pilot_id=revoked.pk)
    set_ = admin_client_logged.get(CHANGELIST, {"token": "set"})
    assert list(set_.context["cl"].result_list) == [kept]
    gone = admin_client_logged.get(CHANGELIST, {"token": "revoked"})
    assert list(gone.context["cl"].result_list) == [revoked]


def test_the_pilot_page_lists_its_commands_and_the_commands_page_is_read_only(
    admin_client_logged,
):
    from django.urls import reverse

    from tests.factories import PilotCommandFactory

    command = PilotCommandFactory(reason="maintenance window")
    page = admin_client_logged.get(reverse("admin:pilots_pilot_change", args=[command.pilot_id]))
    assert page.status_code == 200 and "maintenance window" in page.content.decode()
    listing = admin_client_logged.get(reverse("admin:pilots_pilotcommand_changelist"))
    assert listing.status_code == 200 and "drain" in listing.content.decode()
    assert admin_client_logged.get(reverse("admin:pilots_pilotcommand_add")).status_code == 403
