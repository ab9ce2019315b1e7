"""The four state machines and the one helper that applies them (wms.statemachine).

The pair tests are generated from each machine's own map: every allowed (src, dst) pair must
be applied and logged, every other pair must be refused without a trace. A separate test pins
each map to DESIGN.md section 4, so a map that drifts from the design fails here too.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import models, transaction
from django.utils import timezone

from files.models import DATASET_MACHINE, Dataset, DatasetState
from jobs.models import JOB_MACHINE, Job, JobState, JobTransition
from pilots.models import PILOT_MACHINE, Pilot
from tasks.models import TASK_MACHINE, Task
from tests.factories import DatasetFactory, JobFactory, PilotFactory, TaskFactory
from wms import statemachine
from wms.exceptions import InvalidTransition, NotFound
from wms.statemachine import (
    StateMachine,
    apply_transition,
    apply_transition_bulk,
    apply_transition_by_state,
    apply_transition_chunked,
)

MACHINES = {
    "task": (Task, TASK_MACHINE, TaskFactory),
    "job": (Job, JOB_MACHINE, JobFactory),
    "pilot": (Pilot, PILOT_MACHINE, PilotFactory),
    "dataset": (Dataset, DATASET_MACHINE, DatasetFactory),
}

LONG_AGO = timezone.now() - timedelta(days=3)


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    # TaskFactory makes a user; the default PBKDF2 costs ~0.3 s per user.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _pairs(allowed: bool) -> list:
    return [
        pytest.param(name, src, dst, id=f"{name}:{src}->{dst}")
        for name, (_model, machine, _factory) in MACHINES.items()
        for src, dst in machine.pairs()
        if machine.allowed(src, dst) is allowed
    ]


ALLOWED_PAIRS = _pairs(True)
FORBIDDEN_PAIRS = _pairs(False)


def _make(name: str, state: str) -> models.Model:
    _model, _machine, factory = MACHINES[name]
    return factory.create(state=state, state_changed_at=LONG_AGO)


# --- the maps themselves ------------------------------------------------------------------------

# The maps as reviewed against DESIGN.md section 4, written out edge by edge, so that a change
# to a map is a deliberate change here too. Beyond the design's arrows: job queued -> defined
# (the message could not be published), running -> defined (a failed attempt with retries
# left); a pilot may go from any live state to terminated or lost, and registered may skip idle.
DESIGN_EDGES = {
    "task": {
        ("defined", "running"),
        ("defined", "paused"),
        ("defined", "cancelled"),
        ("running", "paused"),
        ("running", "finished"),
        ("running", "failed"),
        ("running", "cancelled"),
        ("paused", "running"),
        ("paused", "cancelled"),
        # a retry of the task's failed jobs re-opens an ended task
        ("finished", "running"),
        ("failed", "running"),
    },
    "job": {
        ("defined", "queued"),
        ("defined", "cancelled"),
        # a lost attempt reclaimed by its pilot, heard from again
        ("defined", "running"),
        ("queued", "running"),
        ("queued", "defined"),
        ("queued", "cancelled"),
        ("running", "finished"),
        ("running", "failed"),
        ("running", "defined"),
        ("running", "cancelled"),
        # hold / release, and a retry of a failed job
        ("defined", "held"),
        ("queued", "held"),
        ("held", "defined"),
        ("held", "cancelled"),
        ("failed", "defined"),
    },
    "pilot": {
        ("registered", "idle"),
        ("registered", "busy"),
        ("registered", "draining"),
        ("registered", "terminated"),
        ("registered", "lost"),
        ("idle", "busy"),
        ("idle", "draining"),
        ("idle", "terminated"),
        ("idle", "lost"),
        ("busy", "idle"),
        ("busy", "draining"),
        ("busy", "terminated"),
        ("busy", "lost"),
        ("draining", "terminated"),
        ("draining", "lost"),
        # a lost pilot heard from again
        ("lost", "idle"),
        ("lost", "busy"),
        ("lost", "draining"),
    },
    "dataset": {("open", "closed")},
}

DESIGN_FINAL = {
    "task": {"finished", "failed", "cancelled"},
    "job": {"finished", "failed", "cancelled"},
    "pilot": {"terminated", "lost"},
    "dataset": {"closed"},
}


@pytest.mark.parametrize("name", MACHINES)
def test_map_matches_the_design(name):
    _model, machine, _factory = MACHINES[name]
    edges = {(a, b) for a, b in machine.pairs() if machine.allowed(a, b)}
    assert edges == DESIGN_EDGES[name]
    assert set(machine.final_states) == DESIGN_FINAL[name]


@pytest.mark.parametrize("name", MACHINES)
def test_pairs_cover_every_ordered_pair_of_distinct_states(name):
    model, machine, _factory = MACHINES[name]
    states = list(machine.states.values)
    pairs = machine.pairs()
    assert len(pairs) == len(set(pairs)) == len(states) * (len(states) - 1)
    assert all(a != b for a, b in pairs)
    # The model's state column knows exactly the machine's states.
    assert {v for v, _ in model._meta.get_field("state").choices} == set(states)


@pytest.mark.parametrize("name", MACHINES)
def test_sources_is_the_inverse_of_targets(name):
    _model, machine, _factory = MACHINES[name]
    for target in machine.states.values:
        expected = {s for s in machine.states.values if target in machine.targets(s)}
        assert machine.sources(target) == expected


def test_a_map_naming_an_unknown_state_is_refused():
    with pytest.raises(ValueError, match="unknown states"):
        StateMachine(
            entity="thing",
            states=DatasetState,
            transitions={"open": frozenset({"exploded"})},
        )


# --- every pair of every machine, generated from the map --------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "src", "dst"), ALLOWED_PAIRS)
def test_allowed_pair_is_applied_and_logged(name, src, dst):
    model = MACHINES[name][0]
    obj = _make(name, src)

    result = apply_transition(model, obj.pk, dst, source="api", reason="generated test")

    assert result.won is True
    assert (result.from_state, result.to_state) == (src, dst)
    obj.refresh_from_db()
    assert obj.state == dst
    assert obj.state_changed_at > LONG_AGO
    rows = list(obj.transitions.values("from_state", "to_state", "source", "reason", "at"))
    assert len(rows) == 1
    row = rows[0]
    assert (row["from_state"], row["to_state"]) == (src, dst)
    assert (row["source"], row["reason"]) == ("api", "generated test")
    assert row["at"] == obj.state_changed_at

    # asked again (a late or repeated report): a no-op, still one row
    again = apply_transition(model, obj.pk, dst, source="api", reason="repeat")
    assert again.won is False
    assert obj.transitions.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "src", "dst"), FORBIDDEN_PAIRS)
def test_forbidden_pair_is_refused_without_trace(name, src, dst):
    model = MACHINES[name][0]
    obj = _make(name, src)

    with pytest.raises(InvalidTransition) as info:
        apply_transition(model, obj.pk, dst, source="api", reason="must not happen")

    assert (info.value.entity, info.value.pk) == (name, obj.pk)
    assert (info.value.current, info.value.target) == (src, dst)
    assert info.value.status == 409 and info.value.code == "invalid_transition"
    obj.refresh_from_db()
    assert obj.state == src
    assert obj.state_changed_at == LONG_AGO
    assert not obj.transitions.exists()


EVERY_STATE = [
    pytest.param(name, state, id=f"{name}:{state}")
    for name, (_model, machine, _factory) in MACHINES.items()
    for state in machine.states.values
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "state"), EVERY_STATE)
def test_asking_for_the_current_state_is_a_no_op(name, state):
    model = MACHINES[name][0]
    obj = _make(name, state)

    result = apply_transition(model, obj.pk, state, source="api")

    assert result.won is False
    assert (result.from_state, result.to_state) == (state, state)
    obj.refresh_from_db()
    assert obj.state == state
    assert obj.state_changed_at == LONG_AGO
    assert not obj.transitions.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("name", MACHINES)
def test_missing_object_is_not_found(name):
    model, machine, _factory = MACHINES[name]
    target = next(iter(machine.targets(machine.states.values[0])))
    with pytest.raises(NotFound):
        apply_transition(model, 987654321, target, source="api")
    assert not apply_transition_bulk(
        model, [987654321], target, from_state=machine.states.values[0], source="api"
    )


# --- details of apply_transition ---------------------------------------------------------------


@pytest.mark.django_db
def test_two_transitions_in_a_row_are_both_logged_in_order():
    job = JobFactory(state=JobState.QUEUED)
    apply_transition(Job, job.pk, JobState.RUNNING, source="pilot:1")
    apply_transition(Job, job.pk, JobState.FINISHED, source="pilot:1", reason="exit 0")
    rows = list(job.transitions.values_list("from_state", "to_state", "source", "reason"))
    assert rows == [
        ("queued", "running", "pilot:1", ""),
        ("running", "finished", "pilot:1", "exit 0"),
    ]


@pytest.mark.django_db
def test_updates_are_written_by_the_same_update():
    job = JobFactory(state=JobState.RUNNING, cur_retry=0, retries=3)
    end = timezone.now()
    result = apply_transition(
        Job,
        job.pk,
        JobState.DEFINED,
        source="reaper",
        reason="lost",
        updates={"cur_retry": 1, "time_end": end, "pilot": None},
    )
    assert result.won
    job.refresh_from_db()
    assert (job.state, job.cur_retry, job.time_end, job.pilot_id) == ("defined", 1, end, None)


@pytest.mark.django_db
def test_updates_are_not_written_when_the_transition_is_refused():
    job = JobFactory(state=JobState.FINISHED, cur_retry=0)
    with pytest.raises(InvalidTransition):
        apply_transition(Job, job.pk, JobState.DEFINED, source="reaper", updates={"cur_retry": 1})
    job.refresh_from_db()
    assert (job.state, job.cur_retry) == ("finished", 0)


@pytest.mark.django_db
def test_locked_state_is_applied_and_logged_without_reading_the_state_again(
    django_assert_num_queries,
):
    job = JobFactory(state=JobState.QUEUED)
    with transaction.atomic():
        state = Job.objects.select_for_update().values_list("state", flat=True).get(pk=job.pk)
        with django_assert_num_queries(2):  # the UPDATE and the transition row: no savepoint
            result = apply_transition(
                Job, job.pk, JobState.RUNNING, source="pilot:1", locked_state=state
            )
    assert (result.won, result.from_state) == (True, "queued")
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert list(job.transitions.values_list("from_state", "to_state")) == [("queued", "running")]


@pytest.mark.django_db
def test_locked_state_keeps_the_map_and_the_no_op():
    job = JobFactory(state=JobState.FINISHED)
    with pytest.raises(InvalidTransition):
        apply_transition(
            Job, job.pk, JobState.RUNNING, source="pilot:1", locked_state=JobState.FINISHED
        )
    same = apply_transition(
        Job, job.pk, JobState.FINISHED, source="pilot:1", locked_state=JobState.FINISHED
    )
    assert not same.won
    assert not job.transitions.exists()


@pytest.mark.django_db
def test_only_from_narrows_the_allowed_sources():
    queued = JobFactory(state=JobState.QUEUED, state_changed_at=LONG_AGO)
    running = JobFactory(state=JobState.RUNNING, state_changed_at=LONG_AGO)

    # "cancel only if it has not started": allowed from defined/queued, not from running.
    only = [JobState.DEFINED, JobState.QUEUED]
    assert apply_transition(Job, queued.pk, JobState.CANCELLED, source="api", only_from=only).won
    with pytest.raises(InvalidTransition):
        apply_transition(Job, running.pk, JobState.CANCELLED, source="api", only_from=only)

    running.refresh_from_db()
    assert running.state == JobState.RUNNING and running.state_changed_at == LONG_AGO
    assert not running.transitions.exists()
    queued.refresh_from_db()
    assert queued.state == JobState.CANCELLED and queued.transitions.count() == 1


@pytest.mark.django_db
def test_only_from_cannot_widen_the_map():
    job = JobFactory(state=JobState.FINISHED)
    with pytest.raises(InvalidTransition):
        apply_transition(
            Job, job.pk, JobState.CANCELLED, source="api", only_from=[JobState.FINISHED]
        )
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    assert not job.transitions.exists()


# --- apply_transition_bulk ---------------------------------------------------------------------


@pytest.mark.django_db
def test_bulk_moves_only_rows_in_from_state_with_one_log_row_each():
    task = TaskFactory()
    defined = [
        JobFactory(task=task, state=JobState.DEFINED, state_changed_at=LONG_AGO) for _ in range(4)
    ]
    running = JobFactory(task=task, state=JobState.RUNNING, state_changed_at=LONG_AGO)
    untouched = JobFactory(task=task, state=JobState.DEFINED, state_changed_at=LONG_AGO)
    pks = [j.pk for j in defined] + [running.pk]

    moved = apply_transition_bulk(
        Job, pks, JobState.QUEUED, from_state=JobState.DEFINED, source="executor", reason="batch"
    )

    assert sorted(moved) == sorted(j.pk for j in defined)
    for job in defined:
        job.refresh_from_db()
        assert job.state == JobState.QUEUED
        assert job.state_changed_at > LONG_AGO
        rows = list(job.transitions.values_list("from_state", "to_state", "source", "reason"))
        assert rows == [("defined", "queued", "executor", "batch")]
    for job, state in ((running, JobState.RUNNING), (untouched, JobState.DEFINED)):
        job.refresh_from_db()
        assert job.state == state and job.state_changed_at == LONG_AGO
        assert not job.transitions.exists()


@pytest.mark.django_db
def test_bulk_writes_updates():
    jobs = [JobFactory(state=JobState.DEFINED) for _ in range(2)]
    pilot = PilotFactory()
    now = timezone.now()
    moved = apply_transition_bulk(
        Job,
        [j.pk for j in jobs],
        JobState.QUEUED,
        from_state=JobState.DEFINED,
        source="executor",
        updates={"pilot": pilot, "time_start": now},
    )
    assert len(moved) == 2
    assert set(Job.objects.filter(pk__in=moved).values_list("pilot_id", "time_start")) == {
        (pilot.pk, now)
    }


@pytest.mark.django_db
def test_bulk_twice_moves_nothing_the_second_time():
    jobs = [JobFactory(state=JobState.DEFINED) for _ in range(3)]
    pks = [j.pk for j in jobs]
    assert len(apply_transition_bulk(Job, pks, "queued", from_state="defined", source="x")) == 3
    assert apply_transition_bulk(Job, pks, "queued", from_state="defined", source="x") == []
    assert JobTransition.objects.filter(subject_id__in=pks).count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("from_state", "target"),
    [
        (JobState.HELD, JobState.RUNNING),
        (JobState.FINISHED, JobState.DEFINED),
        (JobState.CANCELLED, JobState.QUEUED),
    ],
)
def test_bulk_refuses_a_forbidden_pair_and_writes_nothing(from_state, target):
    jobs = [JobFactory(state=from_state, state_changed_at=LONG_AGO) for _ in range(3)]
    with pytest.raises(InvalidTransition):
        apply_transition_bulk(
            Job, [j.pk for j in jobs], target, from_state=from_state, source="executor"
        )
    for job in jobs:
        job.refresh_from_db()
        assert job.state == from_state and job.state_changed_at == LONG_AGO
        assert not job.transitions.exists()


@pytest.mark.django_db
def test_bulk_with_no_pks_is_empty_and_still_checks_the_map():
    assert apply_transition_bulk(Job, [], "queued", from_state="defined", source="x") == []
    with pytest.raises(InvalidTransition):
        apply_transition_bulk(Job, [], "running", from_state="held", source="x")


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "src", "dst"), ALLOWED_PAIRS)
def test_bulk_applies_every_allowed_pair(name, src, dst):
    model = MACHINES[name][0]
    objs = [_make(name, src) for _ in range(2)]
    moved = apply_transition_bulk(model, [o.pk for o in objs], dst, from_state=src, source="s")
    assert sorted(moved) == sorted(o.pk for o in objs)
    for obj in objs:
        obj.refresh_from_db()
        assert obj.state == dst
        assert obj.transitions.get().to_state == dst


# --- apply_transition_by_state / apply_transition_chunked ---------------------------------------


@pytest.mark.django_db
def test_by_state_moves_each_row_from_its_own_state():
    task = TaskFactory()
    defined = JobFactory(task=task, state=JobState.DEFINED)
    queued = [JobFactory(task=task, state=JobState.QUEUED) for _ in range(2)]
    rows = [(queued[0].pk, JobState.QUEUED), (defined.pk, JobState.DEFINED)]
    rows.append((queued[1].pk, JobState.QUEUED))
    with transaction.atomic():
        locked = list(Job.objects.select_for_update().filter(pk__in=[pk for pk, _ in rows]))
        assert len(locked) == 3
        moved = apply_transition_by_state(Job, rows, JobState.HELD, source="api", reason="hold")

    assert moved == {
        JobState.QUEUED: [queued[0].pk, queued[1].pk],
        JobState.DEFINED: [defined.pk],
    }
    for job, was in ((defined, "defined"), (queued[0], "queued"), (queued[1], "queued")):
        job.refresh_from_db()
        assert job.state == JobState.HELD
        assert list(job.transitions.values_list("from_state", "to_state", "reason")) == [
            (was, "held", "hold")
        ]


@pytest.mark.django_db
def test_chunked_moves_the_rows_in_the_given_states_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(statemachine, "LOCK_CHUNK", 2)  # five rows: three chunks
    task = TaskFactory()
    states = [JobState.DEFINED, JobState.RUNNING, JobState.FINISHED, JobState.QUEUED]
    jobs = [JobFactory(task=task, state=s) for s in [*states, JobState.DEFINED]]
    now = timezone.now()

    with transaction.atomic():
        moved = apply_transition_chunked(
            Job,
            [j.pk for j in jobs],
            JobState.CANCELLED,
            from_states=(JobState.DEFINED, JobState.QUEUED, JobState.RUNNING),
            source="api",
            reason="stop",
            updates={"time_end": now},
        )

    assert moved == {
        JobState.DEFINED: [jobs[0].pk, jobs[4].pk],
        JobState.RUNNING: [jobs[1].pk],
        JobState.QUEUED: [jobs[3].pk],
    }
    for job in jobs:
        job.refresh_from_db()
    assert [j.state for j in jobs] == [
        JobState.CANCELLED,
        JobState.CANCELLED,
        JobState.FINISHED,
        JobState.CANCELLED,
        JobState.CANCELLED,
    ]
    assert jobs[2].time_end is None and not jobs[2].transitions.exists()
    assert all(j.time_end == now for j in jobs if j.state == JobState.CANCELLED)
    logged = JobTransition.objects.filter(to_state="cancelled")
    assert sorted(logged.values_list("subject_id", "from_state")) == sorted(
        [
            (jobs[0].pk, "defined"),
            (jobs[1].pk, "running"),
            (jobs[3].pk, "queued"),
            (jobs[4].pk, "defined"),
        ]
    )


@pytest.mark.django_db
def test_chunked_with_nothing_in_the_states_moves_nothing():
    job = JobFactory(state=JobState.FINISHED)
    with transaction.atomic():
        moved = apply_transition_chunked(
            Job, [job.pk], JobState.HELD, from_states=(JobState.DEFINED,), source="api"
        )
    assert moved == {}
    assert not JobTransition.objects.filter(subject_id=job.pk).exists()
