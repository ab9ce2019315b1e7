"""Serializers of the jobs API (read only: a job changes through ``jobs.services``)."""

from __future__ import annotations

from rest_framework import serializers

from jobs.models import Job, JobAttempt, JobTransition


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
