"""The admin of the run-time switches: every write goes through wms.switches.switch_set."""

import pytest
from django.urls import reverse

from wms.models import Switch
from wms.switches import switch_set

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:wms_switch_changelist")


def messages_of(response):
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def test_pages_render(admin_client_logged):
    switch = switch_set(name="splitter", enabled=True)
    assert admin_client_logged.get(CHANGELIST).status_code == 200
    page = admin_client_logged.get(reverse("admin:wms_switch_change", args=[switch.pk]))
    assert page.status_code == 200
    assert set(page.context["adminform"].form.fields) == {"enabled"}
    assert admin_client_logged.get(reverse("admin:wms_switch_add")).status_code == 200


def test_add_and_edit_go_through_switch_set(admin_client_logged, admin_user):
    response = admin_client_logged.post(
        reverse("admin:wms_switch_add"), {"name": "executor", "enabled": ""}
    )
    assert response.status_code == 302
    switch = Switch.objects.get(pk="executor")
    assert switch.enabled is False and switch.updated_by == admin_user.username

    response = admin_client_logged.post(
        reverse("admin:wms_switch_change", args=["executor"]), {"enabled": "on"}
    )
    assert response.status_code == 302
    assert Switch.objects.get(pk="executor").enabled is True


def test_unknown_service_is_a_form_error(admin_client_logged):
    response = admin_client_logged.post(
        reverse("admin:wms_switch_add"), {"name": "reaper2", "enabled": "on"}
    )
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    assert not Switch.objects.exists()


def test_switch_actions(admin_client_logged, admin_user):
    switch_set(name="splitter", enabled=True)
    switch_set(name="executor", enabled=False)

    response = admin_client_logged.post(
        CHANGELIST,
        {"action": "switch_off", "_selected_action": ["splitter", "executor"]},
        follow=True,
    )

    msgs = messages_of(response)
    assert ("success", "1 service switch switched off.") in msgs
    assert ("warning", "1 service switch already off.") in msgs
    splitter = Switch.objects.get(pk="splitter")
    assert splitter.enabled is False and splitter.updated_by == admin_user.username
