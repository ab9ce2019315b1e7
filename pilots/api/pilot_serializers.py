"""Serializers of the pilot protocol's pilot endpoints (docs/pilot-api.md): registration,
heartbeat, terminate and bulk events. Input serializers validate; the views hand
``validated_data`` to ``pilots.services`` / ``jobs.reports``.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from jobs.api.pilot_serializers import JobMessageSerializer
from jobs.events import OUTCOMES
from pilots.models import CommandKind
from pilots.services import REPORTED_STATES
from wms.api import StrictFieldsMixin
from wms.choices import DeviceType
from wms.contract import MAX_EVENTS, MAX_STARTS

MAX_HEARTBEAT_JOBS = 10_000
MAX_ORPHANS = 100  # jobs in one registration's ``orphans``
MAX_ORPHAN_PIDS = 1000  # pids of one of them
PID_MAX = 1 << 22  # Linux's largest pid (pid_max's ceiling)


class PilotOrphanSerializer(StrictFieldsMixin, serializers.Serializer):
    """One job whose payload a dead pilot left running on the registrant's work directory,
    found and killed by the registrant at start-up (docs/pilot.md, "When the pilot dies")."""

    job_uuid = serializers.UUIDField()
    attempt = serializers.IntegerField(min_value=0, max_value=32767)
    pilot_id = serializers.IntegerField(
        min_value=1,
        max_value=2**63 - 1,
        allow_null=True,
        required=False,
        default=None,
        help_text="The pilot that ran it (the dead one), if it had registered.",
    )
    pids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=PID_MAX),
        max_length=MAX_ORPHAN_PIDS,
        default=list,
        help_text="The processes killed (empty: the record was left, its processes were gone).",
    )


class PilotRegisterSerializer(StrictFieldsMixin, serializers.Serializer):
    """What a pilot says about itself when it registers."""

    hostname = serializers.CharField(max_length=255)
    site = serializers.CharField(max_length=100, allow_blank=True, default="")
    device_type = serializers.ChoiceField(choices=DeviceType.choices)
    cores = serializers.IntegerField(min_value=1, max_value=1_000_000, default=1)
    memory_mb = serializers.IntegerField(min_value=0, max_value=2**62, default=0)
    gpus = serializers.IntegerField(min_value=0, max_value=1_000_000, default=0)
    slots = serializers.IntegerField(min_value=1, max_value=1_000_000, default=1)
    version = serializers.CharField(max_length=50, allow_blank=True, default="")
    orphans = serializers.ListField(
        child=PilotOrphanSerializer(),
        required=False,
        max_length=MAX_ORPHANS,
        help_text="What the pilot found left by a dead pilot in its work directory and killed.",
    )


class PilotRegistrationSerializer(serializers.Serializer):
    """The answer to a registration. ``token`` and ``bus_key`` are shown this once: only the
    token's hash is kept, and the key is derived from it."""

    pilot_id = serializers.IntegerField()
    token = serializers.CharField(
        help_text="The pilot's own token: `Authorization: Pilot <token>`."
    )
    bus_key = serializers.CharField(
        help_text="The key the pilot signs the status events it publishes to the bus with "
        "(HMAC-SHA256 of the body, header `wms-signature`, its id in `wms-pilot-id`). It "
        "lasts as long as the token."
    )
    device_type = serializers.ChoiceField(choices=DeviceType.choices)
    job_queue = serializers.CharField(help_text="The queue of the pilot's device type.")
    command_queue = serializers.CharField(help_text="The pilot's own command queue.")
    bus_prefix = serializers.CharField(help_text="Prefix of every exchange and queue name.")
    queue_type = serializers.ChoiceField(
        choices=[("classic", "classic"), ("quorum", "quorum")],
        help_text="The type of those queues (`WMS_QUEUE_TYPE`): the pilot declares its queues "
        "with it (RabbitMQ refuses a queue redeclared with other arguments).",
    )
    heartbeat_interval = serializers.IntegerField(help_text="Seconds between heartbeats.")


class PilotHeartbeatJobSerializer(serializers.Serializer):
    """One attempt the pilot runs, with its metrics. Besides the fields below, any other key
    with a number value is kept as a metric of the attempt."""

    job_uuid = serializers.UUIDField()
    attempt = serializers.IntegerField(min_value=0, max_value=32767)
    cpu_time = serializers.FloatField(required=False, min_value=0, help_text="CPU seconds.")
    rss_mb = serializers.FloatField(required=False, min_value=0)
    wall_time = serializers.FloatField(required=False, min_value=0, help_text="Seconds.")

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        errors = {}
        for key in sorted(set(data) - set(self.fields)):
            metric = data[key]
            if isinstance(metric, bool) or not isinstance(metric, int | float):
                errors[key] = ["An extra metric must be a number."]
            else:
                value[key] = metric
        if errors:
            raise serializers.ValidationError(errors)
        return value


class PilotHeartbeatReportingSerializer(serializers.Serializer):
    """An attempt whose final report sits in the pilot's spool, not yet accepted."""

    job_uuid = serializers.UUIDField()
    attempt = serializers.IntegerField(min_value=0, max_value=32767)


class PilotHeartbeatSerializer(StrictFieldsMixin, serializers.Serializer):
    """A pilot's heartbeat: its state, status line, metrics, running attempts, acked commands."""

    state = serializers.ChoiceField(choices=list(REPORTED_STATES))
    status = serializers.CharField(max_length=255, allow_blank=True, default="")
    metrics = serializers.DictField(
        required=False, help_text="The node's metrics (load1, free_disk_mb, cpu_percent, ...)."
    )
    jobs = serializers.ListField(
        child=PilotHeartbeatJobSerializer(), max_length=MAX_HEARTBEAT_JOBS, default=list
    )
    reporting = serializers.ListField(
        child=PilotHeartbeatReportingSerializer(),
        max_length=MAX_HEARTBEAT_JOBS,
        required=False,
        help_text="The attempts whose final report the pilot holds in its spool, not yet "
        "accepted. Sent (even empty), it tells the WMS the pilot's whole list: an attempt "
        "the WMS has running on this pilot that is named neither here nor in `jobs` fails "
        "(`not_on_pilot`).",
    )
    acked_commands = serializers.ListField(
        child=serializers.UUIDField(),
        max_length=1000,
        default=list,
        help_text="Ids of the commands the pilot has received (by either path).",
    )


class PilotCommandMessageSerializer(serializers.Serializer):
    """A command for the pilot (``wms.contract.Command`` without ``v``/``kind``/``pilot_id``)."""

    id = serializers.UUIDField()
    command = serializers.ChoiceField(choices=CommandKind.choices)
    job_uuid = serializers.CharField(allow_blank=True, help_text="kill_job: the job; else ''.")
    attempt = serializers.IntegerField(allow_null=True)
    reason = serializers.CharField(allow_blank=True)


class PilotHeartbeatReplySerializer(serializers.Serializer):
    """The heartbeat's answer: the commands not delivered yet (each is returned once)."""

    commands = PilotCommandMessageSerializer(many=True)
    heartbeat_interval = serializers.IntegerField()
    state = serializers.CharField(help_text="The pilot's state as the WMS now has it.")


class PilotTerminateSerializer(StrictFieldsMixin, serializers.Serializer):
    """Why the pilot exits."""

    reason = serializers.CharField(max_length=1000, allow_blank=True, default="")


class PilotTerminatedSerializer(serializers.Serializer):
    pilot_id = serializers.IntegerField()
    state = serializers.CharField()
    attempts_failed = serializers.IntegerField(
        help_text="Running attempts failed with error code pilot_terminated."
    )


@extend_schema_field(
    {
        "type": "array",
        "items": {
            "description": "A status event: the body of `POST /api/v1/jobs/{uuid}/report/` "
            "(JobReportRequest) with its `job_uuid`. Each is validated on its own: an invalid "
            "one gets its error in `results`, the others are applied."
        },
    }
)
class StatusEventListField(serializers.ListField):
    """Events are validated one by one by the service: one bad event spoils no other."""

    child = serializers.JSONField()

    def run_child_validation(self, data: list) -> list:
        # Decoded JSON already: the child's own check (a json.dumps of each event) would only
        # cost time (~7% of a batch of 1,000 running events).
        return list(data)


class PilotEventsSerializer(StrictFieldsMixin, serializers.Serializer):
    """Several status events at once (the bulk form of ``report``)."""

    events = StatusEventListField(min_length=1, max_length=MAX_EVENTS)


class PilotEventResultSerializer(serializers.Serializer):
    """What became of one event: ``outcome`` and ``job_state``, or ``error`` and ``detail``."""

    job_uuid = serializers.CharField()
    attempt = serializers.IntegerField(allow_null=True)
    outcome = serializers.ChoiceField(choices=list(OUTCOMES), required=False)
    job_state = serializers.CharField(required=False)
    error = serializers.CharField(required=False)
    detail = serializers.JSONField(required=False)


class PilotEventsReplySerializer(serializers.Serializer):
    results = PilotEventResultSerializer(many=True)


class StartListField(serializers.ListField):
    """Starts are checked one by one by the service: one bad entry spoils no other."""

    child = serializers.JSONField()

    def run_child_validation(self, data: list) -> list:
        return list(data)  # decoded JSON already (see StatusEventListField)


class PilotStartsSerializer(StrictFieldsMixin, serializers.Serializer):
    """Several starts at once (the batched form of ``POST /jobs/{uuid}/start/``)."""

    starts = StartListField(
        min_length=1,
        max_length=MAX_STARTS,
        help_text="Objects `{job_uuid, attempt}`: the job messages the pilot took from its queue.",
    )


class PilotStartResultSerializer(serializers.Serializer):
    """What became of one start: ``outcome`` ``started`` with the job message to run, or
    ``error`` and ``detail``."""

    job_uuid = serializers.CharField()
    attempt = serializers.IntegerField(allow_null=True)
    outcome = serializers.ChoiceField(choices=["started"], required=False)
    job = JobMessageSerializer(required=False)
    error = serializers.CharField(required=False)
    detail = serializers.JSONField(required=False)


class PilotStartsReplySerializer(serializers.Serializer):
    results = PilotStartResultSerializer(many=True)
