"""Serializers of the jobs API: jobs to read, and the body and answer of an action on a set of
jobs (input serializers validate; a job changes only through ``jobs.control``)."""

from __future__ import annotations

from collections import Counter

from rest_framework import serializers

from jobs.models import Job, JobAttempt, JobTransition
from wms.api import TransitionReasonSerializer


class JobAttemptSerializer(serializers.ModelSerializer):
    """One attempt at running a job; attempts are kept, never overwritten.

    ``number`` is the seed's ``cur_retry`` at the time of the attempt (0 for the first try).
    """

    class Meta:
        model = JobAttempt
        fields = [
            "number",
            "pilot",
            "state",
            "started_at",
            "ended_at",
            "exit_code",
            "error_code",
            "error_message",
            "metrics",
            "metrics_updated_at",
            "kill_requested_at",
            "kill_acked_at",
        ]
        read_only_fields = fields


class JobTransitionSerializer(serializers.ModelSerializer):
    """One state change of a job: from, to, when, who asked (``source``) and why."""

    class Meta:
        model = JobTransition
        fields = ["from_state", "to_state", "at", "source", "reason"]
        read_only_fields = fields


JOB_FIELDS = [
    "id",
    "uuid",
    "task",
    "parent_job",
    "file_in",
    "file_out",
    "file_log",
    "executable",
    "args",
    "rank",
    "state",
    "retries",
    "cur_retry",
    "device_type",
    "mode",
    "level",
    "time_start",
    "time_end",
    "pilot",
    "created_at",
    "updated_at",
    "state_changed_at",
]


class JobSerializer(serializers.ModelSerializer):
    """A job (the seed's JOB_DAT row).

    Mapping to the seed's columns: ``id`` is JOB_DAT.job_id (the integer key) and ``uuid`` is
    JOB_DAT.id (the seed's uuid column); ``task``, ``parent_job``, ``file_in``, ``file_out``,
    ``file_log`` and ``pilot`` are task_id, parent_job_id, file_in_id, file_out_id,
    file_log_id and pilot_id (ids of tasks, jobs, files and pilots). ``executable``, ``args``,
    ``rank``, ``state``, ``retries``, ``cur_retry``, ``device_type``, ``mode``, ``time_start``
    and ``time_end`` keep their seed names.
    """

    class Meta:
        model = Job
        fields = JOB_FIELDS
        read_only_fields = fields


class JobDetailSerializer(JobSerializer):
    """A job with every attempt at running it and the history of its state changes."""

    attempts = JobAttemptSerializer(many=True, read_only=True)
    transitions = JobTransitionSerializer(many=True, read_only=True)

    class Meta(JobSerializer.Meta):
        fields = [*JOB_FIELDS, "attempts", "transitions"]
        read_only_fields = fields


# --- a set of jobs at once ------------------------------------------------------------------------

MAX_BULK_JOB_IDS = 10_000
_MAX_JOB_ID = 2**63 - 1  # the primary key is a bigint
_LISTED_IDS = 20  # ids named in an error message; the rest are counted


def id_list(ids: list[int]) -> str:
    """``5, 9`` or, past ``_LISTED_IDS`` ids, ``1, 2, ..., 20 and 7 more``."""
    shown = ", ".join(str(i) for i in ids[:_LISTED_IDS])
    return f"{shown} and {len(ids) - _LISTED_IDS} more" if len(ids) > _LISTED_IDS else shown


class JobsBulkActionSerializer(TransitionReasonSerializer):
    """Body of a state-change action on a set of jobs (cancel, hold, release)."""

    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=_MAX_JOB_ID),
        min_length=1,
        max_length=MAX_BULK_JOB_IDS,
        help_text=f"The jobs: 1 to {MAX_BULK_JOB_IDS:,} distinct job ids, all of them jobs "
        "the caller may see (else 400 and nothing changes).",
    )

    def validate_ids(self, value: list[int]) -> list[int]:
        repeated = sorted(i for i, n in Counter(value).items() if n > 1)
        if repeated:
            raise serializers.ValidationError(f"Repeated job ids: {id_list(repeated)}.")
        return value


class JobsBulkActionResultSerializer(serializers.Serializer):
    """What an action on a set of jobs did."""

    requested = serializers.IntegerField(help_text="How many jobs were asked for.")
    changed = serializers.IntegerField(help_text="How many jobs this call moved.")
    unchanged = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="The ids of the jobs not in the target state after the call (cancelled, "
        "held, defined): their state does not allow the change (a finished job for cancel, a "
        "running one for hold, a queued one for release). Jobs already in the target state "
        "are neither changed nor listed here.",
    )
