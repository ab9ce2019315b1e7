"""Every admin action of every model exists and works.

An action is listed by name in ``ModelAdmin.actions``; Django resolves the names when the
changelist is drawn and silently leaves out a name with no method behind it (a method indented
into the wrong class, a typo). So:

- each listed name resolves to an action of its ModelAdmin, for a superuser;
- each action is run here through the admin changelist, as an operator runs it, on a row made
  for it, and its effect is checked in the database;
- an action with no scenario below fails the coverage test: a new action needs one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib import admin
from django.test import RequestFactory
from django.urls import reverse

from files.models import DatasetState
from jobs.models import JobState
from pilots.models import PilotState
from tasks.models import TaskState
from tests.factories import (
    DatasetFactory,
    JobFactory,
    PilotFactory,
    TaskFactory,
    UserFactory,
    api_token,
)
from wms.models import Switch

pytestmark = pytest.mark.django_db


OUR_APPS = {"files", "jobs", "pilots", "tasks", "wms"}


def declared_actions() -> list[tuple[str, str]]:
    """(model label, action name) of every name listed in a ModelAdmin of ours (a third-party
    app's admin, django-axes', is its authors' to test)."""
    found = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label not in OUR_APPS:
            continue
        for name in model_admin.actions or ():
            if isinstance(name, str):
                found.append((model._meta.label, name))
    return sorted(found)


@pytest.mark.parametrize(("label", "name"), declared_actions())
def test_a_listed_action_exists(label, name, admin_user):
    model_admin = next(a for m, a in admin.site._registry.items() if m._meta.label == label)
    request = RequestFactory().get("/")
    request.user = admin_user
    assert name in model_admin.get_actions(request), (
        f"{label}: the action {name!r} is listed but has no method on {type(model_admin).__name__}"
    )


# --- each action run through the changelist -----------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    make: Callable[[], Any]  # the row to select
    check: Callable[[Any], bool]  # the effect, read back from the database


def _task(state: str) -> Any:
    return TaskFactory(state=state)


def _task_with_a_failed_job() -> Any:
    job = JobFactory(state=JobState.FAILED, task=TaskFactory(state=TaskState.RUNNING))
    return job.task


def _token_of_a_user() -> Any:
    token, _ = api_token(UserFactory())
    return token


def _switch(enabled: bool) -> Any:
    switch, _ = Switch.objects.update_or_create(name="splitter", defaults={"enabled": enabled})
    return switch


def _refreshed(obj: Any) -> Any:
    return type(obj).objects.get(pk=obj.pk)


SCENARIOS: dict[tuple[str, str], Scenario] = {
    ("files.Dataset", "close_datasets"): Scenario(
        DatasetFactory, lambda d: _refreshed(d).state == DatasetState.CLOSED
    ),
    ("jobs.Job", "cancel_jobs"): Scenario(
        JobFactory, lambda j: _refreshed(j).state == JobState.CANCELLED
    ),
    ("jobs.Job", "hold_jobs"): Scenario(JobFactory, lambda j: _refreshed(j).state == JobState.HELD),
    ("jobs.Job", "release_jobs"): Scenario(
        lambda: JobFactory(state=JobState.HELD), lambda j: _refreshed(j).state == JobState.DEFINED
    ),
    ("pilots.Pilot", "terminate_pilots"): Scenario(
        lambda: PilotFactory(state=PilotState.IDLE),
        lambda p: _refreshed(p).state == PilotState.TERMINATED,
    ),
    ("pilots.Pilot", "revoke_tokens"): Scenario(
        PilotFactory, lambda p: _refreshed(p).token_revoked_at is not None
    ),
    ("tasks.Task", "pause_tasks"): Scenario(
        lambda: _task(TaskState.RUNNING), lambda t: _refreshed(t).state == TaskState.PAUSED
    ),
    ("tasks.Task", "resume_tasks"): Scenario(
        lambda: _task(TaskState.PAUSED), lambda t: _refreshed(t).state == TaskState.RUNNING
    ),
    ("tasks.Task", "cancel_tasks"): Scenario(
        lambda: _task(TaskState.RUNNING), lambda t: _refreshed(t).state == TaskState.CANCELLED
    ),
    ("tasks.Task", "retry_failed_jobs"): Scenario(
        _task_with_a_failed_job,
        lambda t: t.jobs.get().state == JobState.DEFINED and t.jobs.get().cur_retry == 1,
    ),
    ("wms.Switch", "switch_off"): Scenario(
        lambda: _switch(True), lambda s: _refreshed(s).enabled is False
    ),
    ("wms.Switch", "switch_on"): Scenario(
        lambda: _switch(False), lambda s: _refreshed(s).enabled is True
    ),
    ("wms.ApiToken", "revoke_tokens"): Scenario(
        _token_of_a_user, lambda t: _refreshed(t).revoked_at is not None
    ),
}


def test_every_listed_action_has_a_scenario():
    assert sorted(SCENARIOS) == declared_actions()


@pytest.mark.parametrize(("label", "name"), sorted(SCENARIOS))
def test_the_action_runs_from_the_changelist(label, name, admin_client_logged):
    scenario = SCENARIOS[(label, name)]
    obj = scenario.make()
    app_label, model_name = label.lower().split(".")
    url = reverse(f"admin:{app_label}_{model_name}_changelist")
    response = admin_client_logged.post(
        url, {"action": name, "_selected_action": [obj.pk]}, follow=True
    )
    assert response.status_code == 200
    errors = [str(m) for m in response.context["messages"] if m.level_tag in ("error", "warning")]
    assert not errors, errors
    assert scenario.check(obj), f"{label}.{name} changed nothing"
