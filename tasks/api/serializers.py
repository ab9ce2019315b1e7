"""Serializers of the tasks API: read shapes and validated input. They never write; the views
hand ``validated_data`` to ``tasks.services``.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from files.selectors import dataset_get
from tasks.models import Task, TaskTransition
from tasks.selectors import task_job_counts
from wms.api import StrictFieldsMixin
from wms.exceptions import NotFound


class JobCountsSerializer(serializers.Serializer):
    """How many jobs of a task are in each state (every state present, 0 where none).

    One field per ``jobs.models.JobState`` value (a test keeps the two in step).
    """

    defined = serializers.IntegerField(min_value=0)
    queued = serializers.IntegerField(min_value=0)
    held = serializers.IntegerField(min_value=0)
    running = serializers.IntegerField(min_value=0)
    finished = serializers.IntegerField(min_value=0)
    failed = serializers.IntegerField(min_value=0)
    cancelled = serializers.IntegerField(min_value=0)


class TaskTransitionSerializer(serializers.ModelSerializer):
    """One state change of a task: from, to, when, who asked (``source``) and why."""

    class Meta:
        model = TaskTransition
        fields = ["from_state", "to_state", "at", "source", "reason"]
        read_only_fields = fields


TASK_FIELDS = [
    "id",
    "name",
    "owner",
    "owner_username",
    "state",
    "executable",
    "args",
    "rank",
    "device_type",
    "mode",
    "data_in_uid",
    "data_out_uid",
    "storage_url",
    "data_out_url",
    "files_per_job",
    "max_retries",
    "max_failed_fraction",
    "splitter_enabled",
    "executor_enabled",
    "merge_group_size",
    "merge_executable",
    "merge_args",
    "merge_max_level",
    "merge_on_child_failure",
    "merge_groups_failed",
    "jobs_finished",
    "jobs_failed",
    "jobs_cancelled",
    "output_closed_at",
    "created_at",
    "updated_at",
    "state_changed_at",
    "job_counts",
]


class TaskSerializer(serializers.ModelSerializer):
    """A task (the seed's TASK_DAT row) with its jobs counted per state.

    Mapping to the seed's columns: ``id`` is TASK_DAT.task_id; ``executable``, ``args``,
    ``rank``, ``device_type``, ``mode``, ``data_in_uid``, ``storage_url`` and ``data_out_url``
    keep their seed names. The rest is what the WMS adds (``owner`` is the owner's user id).
    """

    owner_username = serializers.CharField(source="owner.get_username", read_only=True)
    job_counts = serializers.SerializerMethodField()

    class Meta:
        model = Task
        fields = TASK_FIELDS
        read_only_fields = fields

    @extend_schema_field(JobCountsSerializer)
    def get_job_counts(self, obj: Task) -> dict[str, int]:
        # A list passes the counts of its whole page in the context (one query for the page).
        page_counts = self.context.get("job_counts")
        if page_counts is not None and obj.pk in page_counts:
            return page_counts[obj.pk]
        return task_job_counts(task_id=obj.pk)


class TaskDetailSerializer(TaskSerializer):
    """A task with its job counts and the history of its state changes."""

    transitions = TaskTransitionSerializer(many=True, read_only=True)

    class Meta(TaskSerializer.Meta):
        fields = [*TASK_FIELDS, "transitions"]
        read_only_fields = fields


class TaskCreateSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """What a user gives to define a task; the owner is the user who asks.

    ``data_in_uid`` must name a dataset of the DSM catalogue.
    """

    class Meta:
        model = Task
        fields = [
            "name",
            "executable",
            "args",
            "rank",
            "device_type",
            "mode",
            "data_in_uid",
            "storage_url",
            "data_out_url",
            "files_per_job",
            "max_retries",
            "max_failed_fraction",
            "splitter_enabled",
            "executor_enabled",
            "merge_group_size",
            "merge_executable",
            "merge_args",
            "merge_max_level",
            "merge_on_child_failure",
        ]

    def validate_data_in_uid(self, value: Any) -> Any:
        try:
            dataset_get(uid=value)
        except NotFound as exc:
            raise serializers.ValidationError("No dataset with this uid.") from exc
        return value


class TaskUpdateSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """The fields of a task that may change at run time (PATCH); any other field is a 400."""

    unknown_field_message = "This field cannot be changed."

    class Meta:
        model = Task
        fields = [
            "name",
            "rank",
            "max_retries",
            "max_failed_fraction",
            "splitter_enabled",
            "executor_enabled",
            "merge_group_size",
            "merge_executable",
            "merge_args",
            "merge_max_level",
            "merge_on_child_failure",
        ]
