"""PILOT_DAT: an agent on a worker node that takes jobs from its device queue and runs them."""

import uuid

from django.db import models
from django.utils import timezone

from wms.choices import DeviceType
from wms.choices import PilotState as PilotState  # the states live in wms (named by jobs too)
from wms.models import TransitionLog
from wms.statemachine import StateMachine

PS = PilotState
PILOT_MACHINE = StateMachine(
    entity="pilot",
    states=PilotState,
    transitions={
        PS.REGISTERED: frozenset({PS.IDLE, PS.BUSY, PS.DRAINING, PS.TERMINATED, PS.LOST}),
        PS.IDLE: frozenset({PS.BUSY, PS.DRAINING, PS.TERMINATED, PS.LOST}),
        PS.BUSY: frozenset({PS.IDLE, PS.DRAINING, PS.TERMINATED, PS.LOST}),
        PS.DRAINING: frozenset({PS.TERMINATED, PS.LOST}),
        PS.TERMINATED: frozenset(),
        # lost -> live: a pilot the reaper gave up on was heard from again (its heartbeat)
        PS.LOST: frozenset({PS.IDLE, PS.BUSY, PS.DRAINING}),
    },
    # lost is an end the WMS decided, not the pilot: a heartbeat may re-open it
    final=frozenset({PS.TERMINATED, PS.LOST}),
)

LIVE_PILOT_STATES = (PS.REGISTERED, PS.IDLE, PS.BUSY, PS.DRAINING)


class Pilot(models.Model):
    STATE_MACHINE = PILOT_MACHINE
    TRANSITION_MODEL = "pilots.PilotTransition"

    # seed: PILOT_DAT.status, a free-text status line as the pilot reports it
    status = models.CharField(max_length=255, blank=True, default="")
    state = models.CharField(
        max_length=20, choices=PilotState.choices, default=PilotState.REGISTERED
    )
    hostname = models.CharField(max_length=255)
    site = models.CharField(max_length=100, blank=True, default="")
    device_type = models.CharField(max_length=3, choices=DeviceType.choices, default=DeviceType.CPU)
    cores = models.PositiveIntegerField(default=1)
    memory_mb = models.PositiveBigIntegerField(default=0)
    gpus = models.PositiveIntegerField(default=0)
    slots = models.PositiveIntegerField(default=1)
    version = models.CharField(max_length=50, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    token_revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["last_heartbeat"],
                condition=models.Q(state__in=["registered", "idle", "busy", "draining"]),
                name="pilot_live_heartbeat",
            ),
            models.Index(fields=["site", "device_type"], name="pilot_site_device"),
        ]

    def __str__(self) -> str:
        return f"pilot {self.pk} ({self.hostname})"


class PilotTransition(TransitionLog):
    subject = models.ForeignKey(Pilot, on_delete=models.CASCADE, related_name="transitions")

    class Meta(TransitionLog.Meta):
        indexes = [models.Index(fields=["subject", "at"], name="pilot_tr_subject_at")]


class CommandKind(models.TextChoices):
    KILL_JOB = "kill_job", "kill job"
    DRAIN = "drain", "drain"
    SHUTDOWN = "shutdown", "shut down"


class PilotCommand(models.Model):
    """An order to one pilot: kill one attempt of a job, drain, or shut down.

    A command reaches the pilot by two paths (DESIGN.md section 5): it is published to the
    pilot's command queue after commit (``published_at``) and returned by the pilot's next
    heartbeat (``delivered_at``, once). The pilot de-duplicates by ``id`` and acknowledges it
    in a later heartbeat (``acked_at``).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    pilot = models.ForeignKey(Pilot, on_delete=models.CASCADE, related_name="commands")
    command = models.CharField(max_length=20, choices=CommandKind.choices)
    job = models.ForeignKey(
        "jobs.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    attempt = models.PositiveSmallIntegerField(null=True, blank=True)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    delivered_at = models.DateTimeField(
        null=True, blank=True, help_text="When a heartbeat reply carried it (once)."
    )
    published_at = models.DateTimeField(
        null=True, blank=True, help_text="When the pilot's command queue took it."
    )
    acked_at = models.DateTimeField(
        null=True, blank=True, help_text="When the pilot said it had it."
    )

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            # The heartbeat's question: "what has this pilot not been given yet?"
            models.Index(
                fields=["pilot", "created_at"],
                condition=models.Q(delivered_at__isnull=True),
                name="pilotcmd_undelivered",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.command} → pilot {self.pilot_id}"


class ReaperState(models.Model):
    """The reaper's memory (one row, ``name="reaper"``): what it needs to judge silence.

    - ``last_run_at``: its last cycle. A cycle that finds the previous one older than
      ``WMS_REAPER_ABSENT_AFTER`` knows the reaper itself was away: it cannot tell a dead pilot
      from a server that was down too, so every pilot's silence is counted from now on
      (``grace_from``).
    - ``hold_since``: a hold in force (many or all live pilots silent at once: the server was
      the likely culprit; nobody is declared lost but past ``WMS_PILOT_LOST_AFTER_OUTAGE``),
      with the counts of its last cycle (``hold_silent`` of ``hold_live``) and its reason.
    - ``grace_from``: silence is counted from here at the earliest: the end of the last hold,
      or the reaper's return after an absence (``grace_reason`` says which).
    - ``last_hold_started_at`` / ``last_hold_ended_at``: the last hold that ended, for the record.

    Written only by ``pilots.services.pilots_reap_lost``, under the row's lock.
    """

    name = models.CharField(max_length=20, primary_key=True, default="reaper")
    last_run_at = models.DateTimeField(null=True, blank=True)
    hold_since = models.DateTimeField(null=True, blank=True)
    hold_reason = models.CharField(max_length=255, blank=True, default="")
    hold_silent = models.PositiveIntegerField(default=0)
    hold_live = models.PositiveIntegerField(default=0)
    grace_from = models.DateTimeField(null=True, blank=True)
    grace_reason = models.CharField(max_length=255, blank=True, default="")
    last_hold_started_at = models.DateTimeField(null=True, blank=True)
    last_hold_ended_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "reaper state"
        verbose_name_plural = "reaper state"

    def __str__(self) -> str:
        if self.hold_since is not None:
            return f"reaper: holding since {self.hold_since:%Y-%m-%d %H:%M:%S}"
        return "reaper: normal"
