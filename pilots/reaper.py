"""The reaper of silent pilots (docs/pilots.md): a pilot silent for longer than
``WMS_PILOT_LOST_AFTER`` is lost and its attempts are interrupted, unless most pilots went
silent at once or the reaper itself was away (then it holds: silence of the server is not death
of the pilots)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from pilots.models import (
    LIVE_PILOT_STATES,
    Pilot,
    PilotState,
    ReaperState,
)
from wms.choices import TransitionSource
from wms.statemachine import apply_transition_by_state
from wms.switches import service_tick, switch_enabled

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReapResult:
    pilots: int = 0  # pilots found silent, now lost
    attempts: int = 0  # running attempts of lost pilots, now lost
    retried: int = 0  # their jobs back to defined
    failed: int = 0  # their jobs failed (no retry left)
    holding: bool = False  # a hold is in force: silence judged as the server's (see below)
    silent: int = 0  # live pilots silent for WMS_PILOT_LOST_AFTER (before any grace)
    live: int = 0  # live pilots


@dataclass(frozen=True)
class SilenceJudgement:
    """What one reaper cycle concluded (:func:`judge_silence`)."""

    live: int
    silent: int
    hold: bool
    reason: str = ""


def judge_silence(*, live: int, silent: int) -> SilenceJudgement:
    """Is this silence the pilots' or the server's? The rule of Kubernetes' node lifecycle
    controller, for one zone (all the pilots): when no live pilot is heard from (full
    disruption), or at least ``WMS_REAPER_MASS_SILENCE_MIN`` of them and at least the fraction
    ``WMS_REAPER_MASS_SILENCE_FRACTION`` are silent (partial disruption), the likely culprit is
    the server or the network in front of it, and nobody is declared lost: a hold.

    A lone pilot (one live pilot) cannot tell its own death from the server's absence: its
    silence is its own. If it was the server, the pilot comes back and reclaims its attempts
    (``pilots.reconcile``), no other pilot having taken them meanwhile."""
    if live >= 2 and silent >= live:
        return SilenceJudgement(live, silent, True, f"all {live} live pilots are silent")
    if (
        silent >= settings.WMS_REAPER_MASS_SILENCE_MIN
        and silent >= settings.WMS_REAPER_MASS_SILENCE_FRACTION * live
    ):
        return SilenceJudgement(
            live, silent, True, f"{silent} of {live} live pilots are silent at once"
        )
    return SilenceJudgement(live, silent, False)


def _reaper_state() -> ReaperState:
    """The reaper's row, locked for this cycle (created at the first cycle)."""
    ReaperState.objects.get_or_create(name="reaper")
    return ReaperState.objects.select_for_update().get(name="reaper")


def _since(value: datetime | None, now: datetime) -> str:
    return "-" if value is None else f"{(now - value).total_seconds():.0f}s ago"


def pilots_reap_lost(
    *, beat: bool = False, now: datetime | None = None, limit: int = 1000
) -> ReapResult:
    """The reaper (``wms.reap_pilots``): silent pilots become ``lost``, their attempts too;
    silence is judged with care (docs/lifecycle.md, "The reaper").

    1. The cycle locks the reaper's row (:class:`~pilots.models.ReaperState`). If its last
       cycle is older than ``WMS_REAPER_ABSENT_AFTER``, the reaper itself was away: every
       silence is counted from now (``grace_from``), so its return reaps nobody at once.
    2. It counts the live pilots and the silent ones (no heartbeat for
       ``WMS_PILOT_LOST_AFTER``) and judges (:func:`judge_silence`). A hold starts, goes on
       (a warning each cycle: how many, since when) or ends; at its end ``grace_from`` is set,
       so the pilots still silent get a fresh ``WMS_PILOT_LOST_AFTER``.
    3. Lost are the live pilots silent for ``WMS_PILOT_LOST_AFTER`` counted from
       ``max(last heartbeat, grace_from)``, unless a hold is in force; and, hold or not, those
       silent for ``WMS_PILOT_LOST_AFTER_OUTAGE`` counted the same way (the safety valve: a
       lone dead pilot is reaped in the end). They are taken ``FOR UPDATE SKIP LOCKED`` (a
       pilot in the middle of a heartbeat is skipped) and moved with one UPDATE per state.
    4. The running attempts of lost pilots become ``lost`` (error code ``lost_heartbeat``);
       their jobs go back to ``defined`` with ``cur_retry + 1``, or fail when no retry is left.
       Jobs locked by a concurrent report are skipped and taken at the next cycle. A lost
       pilot that comes back may reclaim them (``pilots.reconcile``).

    ``beat=True`` first claims the cycle (``service_tick("reaper")``); the reaper can be
    switched off like the splitter and the executor.
    """
    from jobs.control import attempts_interrupt
    from jobs.models import AttemptState

    if beat and not service_tick("reaper", min_interval=settings.WMS_REAP_EVERY / 2):
        return ReapResult()
    if not switch_enabled("reaper"):
        return ReapResult()
    now = now or timezone.now()
    lost_after = timedelta(seconds=settings.WMS_PILOT_LOST_AFTER)
    outage_after = timedelta(
        seconds=max(settings.WMS_PILOT_LOST_AFTER_OUTAGE, settings.WMS_PILOT_LOST_AFTER)
    )
    with transaction.atomic():
        state = _reaper_state()
        previous = state.last_run_at
        if previous is not None and (now - previous).total_seconds() > (
            settings.WMS_REAPER_ABSENT_AFTER
        ):
            state.grace_from = now
            state.grace_reason = f"the reaper was away since {previous.isoformat()}"
            log.warning(
                "reaper_returned_after_absence",
                last_run_at=previous.isoformat(),
                away_s=round((now - previous).total_seconds()),
                detail="silence is counted from now: nobody is declared lost for "
                f"{settings.WMS_PILOT_LOST_AFTER} s",
            )
        state.last_run_at = now
        heard = Coalesce("last_heartbeat", "created_at")
        counts = (
            Pilot.objects.filter(state__in=LIVE_PILOT_STATES)
            .annotate(heard_at=heard)
            .aggregate(
                live=Count("id"),
                silent=Count("id", filter=Q(heard_at__lt=now - lost_after)),
                newest_silent=Max("heard_at", filter=Q(heard_at__lt=now - lost_after)),
            )
        )
        judgement = judge_silence(live=counts["live"], silent=counts["silent"])
        _hold_bookkeeping(state, judgement, now, counts["newest_silent"])
        state.save()

        # Silence is counted from max(last heartbeat, grace_from); during a hold only the
        # safety valve's limit applies (it is never shorter than WMS_PILOT_LOST_AFTER).
        grace_from = state.grace_from
        cutoff = now - (outage_after if judgement.hold else lost_after)
        if grace_from is not None and grace_from >= cutoff:
            rows: list[tuple[int, str]] = []
        else:
            rows = list(
                Pilot.objects.select_for_update(skip_locked=True)
                .filter(state__in=LIVE_PILOT_STATES)
                .filter(
                    Q(last_heartbeat__lt=cutoff)
                    | Q(last_heartbeat__isnull=True, created_at__lt=cutoff)
                )
                .order_by("last_heartbeat", "id")
                .values_list("id", "state")[:limit]
            )
        seconds = int((now - cutoff).total_seconds())
        reason = f"no heartbeat for {seconds} s" + (
            f" (past the outage limit, during a hold: {judgement.reason})" if judgement.hold else ""
        )
        apply_transition_by_state(
            Pilot, rows, PilotState.LOST, source=TransitionSource.REAPER, reason=reason
        )
        lost = attempts_interrupt(
            pilot_states=(PilotState.LOST,),
            attempt_state=AttemptState.LOST,
            error_code="lost_heartbeat",
            error_message=f"the pilot was silent for {settings.WMS_PILOT_LOST_AFTER} s or more",
            source=TransitionSource.REAPER,
            skip_locked=True,
        )
        # A start that raced a terminate: the attempt began on a pilot that is gone.
        gone = attempts_interrupt(
            pilot_states=(PilotState.TERMINATED,),
            attempt_state=AttemptState.FAILED,
            error_code="pilot_terminated",
            error_message="the pilot terminated",
            source=TransitionSource.REAPER,
            skip_locked=True,
        )
    result = ReapResult(
        pilots=len(rows),
        attempts=lost.attempts + gone.attempts,
        retried=lost.retried + gone.retried,
        failed=lost.failed + gone.failed,
        holding=judgement.hold,
        silent=judgement.silent,
        live=judgement.live,
    )
    if rows or result.attempts:
        log.info(
            "pilots_reaped",
            pilots=result.pilots,
            attempts=result.attempts,
            retried=result.retried,
            failed=result.failed,
            holding=judgement.hold,
        )
    return result


def _hold_bookkeeping(
    state: ReaperState, judgement: SilenceJudgement, now: datetime, newest_silent: Any
) -> None:
    """Start, continue or end the hold on ``state`` (saved by the caller), with its logs."""
    if judgement.hold:
        if state.hold_since is None:
            state.hold_since = now
            log.warning(
                "reaper_hold_started",
                silent=judgement.silent,
                live=judgement.live,
                reason=judgement.reason,
                last_heard=_since(newest_silent, now),
                detail="the server was likely unreachable: nobody is declared lost "
                f"(but past {settings.WMS_PILOT_LOST_AFTER_OUTAGE} s of silence)",
            )
        else:
            log.warning(
                "reaper_holding",
                silent=judgement.silent,
                live=judgement.live,
                reason=judgement.reason,
                hold_since=state.hold_since.isoformat(),
                held_s=round((now - state.hold_since).total_seconds()),
                last_heard=_since(newest_silent, now),
            )
        state.hold_reason = judgement.reason[:255]
        state.hold_silent = judgement.silent
        state.hold_live = judgement.live
    elif state.hold_since is not None:
        log.warning(
            "reaper_hold_ended",
            hold_since=state.hold_since.isoformat(),
            held_s=round((now - state.hold_since).total_seconds()),
            still_silent=judgement.silent,
            live=judgement.live,
            detail=f"the pilots still silent get {settings.WMS_PILOT_LOST_AFTER} s from now",
        )
        state.last_hold_started_at = state.hold_since
        state.last_hold_ended_at = now
        state.grace_from = now
        state.grace_reason = f"the end of a hold ({state.hold_reason})"[:255]
        state.hold_since = None
        state.hold_reason = ""
        state.hold_silent = state.hold_live = 0
