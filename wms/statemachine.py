"""State machines: one transition map per model, and ONE helper that applies a transition.

A model that has a state machine declares two class attributes::

    STATE_MACHINE = StateMachine(entity="job", states=JobState, transitions={...})
    TRANSITION_MODEL = "jobs.JobTransition"     # a wms.models.TransitionLog with `subject`

``apply_transition`` changes the state with a conditional UPDATE
(``UPDATE ... SET state = target WHERE id = ? AND state = <current>`` where ``current`` is one of
the allowed sources), writes the transition row in the same transaction, and says whether it won.
Two writers racing on the same row cannot both win: the loser's UPDATE matches no row once the
winner committed, and the loser re-reads the state it lost to. Asking again for the state the
object is already in is a harmless no-op; asking for a state the map forbids raises
``InvalidTransition`` (HTTP 409 at the API).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.db import models, transaction
from django.utils import timezone

from wms import db
from wms.exceptions import Conflict, InvalidTransition, NotFound


@dataclass(frozen=True)
class StateMachine:
    entity: str
    states: type[models.TextChoices]
    transitions: Mapping[str, frozenset[str]]
    # The states where the object's life has ended, when some of them may still be re-opened
    # by a deliberate action (a retry): without it, the states with no way out.
    final: frozenset[str] | None = None
    _sources: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        values = set(self.states.values)
        for src, targets in self.transitions.items():
            unknown = ({src} | set(targets)) - values
            if unknown:
                raise ValueError(f"{self.entity}: unknown states in transition map: {unknown}")
        if self.final is not None and set(self.final) - values:
            raise ValueError(f"{self.entity}: unknown final states: {set(self.final) - values}")
        for target in values:
            self._sources[target] = frozenset(
                src for src, targets in self.transitions.items() if target in targets
            )

    def sources(self, target: str) -> frozenset[str]:
        """The states from which ``target`` may be reached."""
        return self._sources.get(target, frozenset())

    def targets(self, source: str) -> frozenset[str]:
        return frozenset(self.transitions.get(source, frozenset()))

    def allowed(self, source: str, target: str) -> bool:
        return target in self.targets(source)

    @property
    def final_states(self) -> frozenset[str]:
        if self.final is not None:
            return frozenset(self.final)
        return frozenset(s for s in self.states.values if not self.transitions.get(s))

    def pairs(self) -> list[tuple[str, str]]:
        """Every (source, target) pair of distinct states, allowed or not (for tests and docs)."""
        vals = list(self.states.values)
        return [(a, b) for a in vals for b in vals if a != b]


@dataclass(frozen=True)
class TransitionResult:
    won: bool
    from_state: str
    to_state: str


def _log_model(model: type[models.Model]) -> type[models.Model]:
    return apps.get_model(model.TRANSITION_MODEL)  # type: ignore[attr-defined]


def _field_names(model: type[models.Model]) -> set[str]:
    return {f.name for f in model._meta.concrete_fields}


def apply_transition(
    model: type[models.Model],
    pk: Any,
    target: str,
    *,
    source: str,
    reason: str = "",
    updates: Mapping[str, Any] | None = None,
    only_from: Iterable[str] | None = None,
    locked_state: str | None = None,
) -> TransitionResult:
    """Move object ``pk`` of ``model`` to ``target``; see the module docstring.

    ``updates`` are other columns written by the same UPDATE (``time_end``, ``cur_retry``, ...).
    ``only_from`` narrows the map's sources for this call (e.g. "cancel only if not running").
    ``locked_state``: the caller holds the row's lock (``SELECT ... FOR UPDATE`` in the current
    transaction) and read this state under it, so the state is not read again and no
    savepoint is needed: the UPDATE and the transition row, or the error, and nothing else.
    """
    machine: StateMachine = model.STATE_MACHINE  # type: ignore[attr-defined]
    allowed = machine.sources(target)
    if only_from is not None:
        allowed = allowed & frozenset(only_from)
    now = timezone.now()
    fields = _field_names(model)
    values: dict[str, Any] = {"state": target, **(updates or {})}
    if "state_changed_at" in fields:
        values["state_changed_at"] = now
    if "updated_at" in fields:
        values["updated_at"] = now

    manager = model._default_manager
    if locked_state is not None:
        if locked_state == target:
            return TransitionResult(won=False, from_state=locked_state, to_state=target)
        if locked_state not in allowed:
            raise InvalidTransition(
                entity=machine.entity, pk=pk, current=locked_state, target=target
            )
        with transaction.atomic(savepoint=False):
            if not manager.filter(pk=pk, state=locked_state).update(**values):
                raise Conflict(
                    f"{machine.entity} {pk} left {locked_state} under a lock that should have "
                    "held it."
                )
            _log_model(model)._default_manager.create(
                subject_id=pk,
                from_state=locked_state,
                to_state=target,
                at=now,
                source=source,
                reason=reason,
            )
        return TransitionResult(won=True, from_state=locked_state, to_state=target)
    with transaction.atomic():
        # A bounded compare-and-set loop: each lost round means another writer changed the
        # state in between, and the next round re-reads what it changed it to.
        for _ in range(8):
            current = manager.filter(pk=pk).values_list("state", flat=True).first()
            if current is None:
                raise NotFound(f"{machine.entity} {pk} does not exist.")
            if current == target:
                return TransitionResult(won=False, from_state=current, to_state=target)
            if current not in allowed:
                raise InvalidTransition(
                    entity=machine.entity, pk=pk, current=current, target=target
                )
            if manager.filter(pk=pk, state=current).update(**values):
                _log_model(model)._default_manager.create(
                    subject_id=pk,
                    from_state=current,
                    to_state=target,
                    at=now,
                    source=source,
                    reason=reason,
                )
                return TransitionResult(won=True, from_state=current, to_state=target)
    raise Conflict(f"{machine.entity} {pk}: state kept changing under this request; retry.")


def apply_transition_bulk(
    model: type[models.Model],
    pks: list[Any],
    target: str,
    *,
    from_state: str,
    source: str,
    reason: str = "",
    updates: Mapping[str, Any] | None = None,
    locked: bool = False,
) -> list[Any]:
    """Move every row of ``pks`` that is in ``from_state`` to ``target`` with ONE UPDATE.

    For batch paths (executor, splitter, reaper) whose caller already holds the rows
    (``SELECT ... FOR UPDATE SKIP LOCKED``) in the current transaction. ``locked=True`` says
    the caller selected exactly these rows in ``from_state`` under that lock, so they are not
    read again. Returns the pks moved.
    """
    machine: StateMachine = model.STATE_MACHINE  # type: ignore[attr-defined]
    if not machine.allowed(from_state, target):
        raise InvalidTransition(entity=machine.entity, pk=pks, current=from_state, target=target)
    if not pks:
        return []
    now = timezone.now()
    fields = _field_names(model)
    values: dict[str, Any] = {"state": target, **(updates or {})}
    if "state_changed_at" in fields:
        values["state_changed_at"] = now
    if "updated_at" in fields:
        values["updated_at"] = now
    manager = model._default_manager
    # Rows the caller holds need no savepoint: an error here rolls back the caller's batch.
    with transaction.atomic(savepoint=not locked):
        if locked:
            moved = list(pks)
        else:
            # Lock the rows first: a row another writer moved meanwhile is re-checked once its
            # writer commits and drops out here, so it is neither returned nor logged twice.
            moved = list(
                manager.select_for_update()
                .filter(pk__in=pks, state=from_state)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            if not moved:
                return []
        updated = manager.filter(pk__in=moved, state=from_state).update(**values)
        if updated != len(moved):
            raise Conflict(
                f"{machine.entity}: {len(moved) - updated} row(s) left {from_state} under a "
                "batch that should have held them; the batch is rolled back."
            )
        log = _log_model(model)
        if db.copy_supported():
            db.copy_rows(
                log,
                ("subject_id", "from_state", "to_state", "at", "source", "reason"),
                ((pk, from_state, target, now, source, reason) for pk in moved),
            )
        else:
            log._default_manager.bulk_create(
                [
                    log(
                        subject_id=pk,
                        from_state=from_state,
                        to_state=target,
                        at=now,
                        source=source,
                        reason=reason,
                    )
                    for pk in moved
                ],
                batch_size=5000,
            )
    return moved


def apply_transition_by_state(
    model: type[models.Model],
    rows: Iterable[tuple[Any, str]],
    target: str,
    *,
    source: str,
    reason: str = "",
    updates: Mapping[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Move rows the caller holds locked (``FOR UPDATE``, in this transaction), given as
    ``(pk, current state)``, to ``target``: one :func:`apply_transition_bulk` per current
    state (an UPDATE and a log insert each; the log records each row's own from-state).
    Returns the pks moved by the state they left, in the order given."""
    by_state: dict[str, list[Any]] = {}
    for pk, state in rows:
        by_state.setdefault(state, []).append(pk)
    for state, pks in by_state.items():
        apply_transition_bulk(
            model,
            pks,
            target,
            from_state=state,
            source=source,
            reason=reason,
            updates=updates,
            locked=True,
        )
    return by_state


LOCK_CHUNK = 5000  # rows locked and moved at a time by apply_transition_chunked


def apply_transition_chunked(
    model: type[models.Model],
    pks: Iterable[Any],
    target: str,
    *,
    from_states: Iterable[str],
    source: str,
    reason: str = "",
    updates: Mapping[str, Any] | None = None,
) -> dict[str, list[Any]]:
    """Move the rows of ``pks`` that are in one of ``from_states`` to ``target``; the others
    are skipped. :data:`LOCK_CHUNK` rows at a time: locked (``FOR UPDATE``, waiting for a
    writer in flight, in pk order), then :func:`apply_transition_by_state`. A constant
    number of queries per chunk. For the caller's transaction (the locks are held until it
    ends). Returns the pks moved by the state they left."""
    ids = list(pks)
    states = list(from_states)
    manager = model._default_manager
    moved: dict[str, list[Any]] = {}
    for start in range(0, len(ids), LOCK_CHUNK):
        rows = (
            manager.select_for_update()
            .filter(pk__in=ids[start : start + LOCK_CHUNK], state__in=states)
            .order_by("pk")
            .values_list("pk", "state")
        )
        for state, done in apply_transition_by_state(
            model, rows, target, source=source, reason=reason, updates=updates
        ).items():
            moved.setdefault(state, []).extend(done)
    return moved
