"""Serializers of the tasks API: read shapes and validated input. They never write; the views
hand ``validated_data`` to the services (``tasks.create``, ``tasks.inputs``).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tasks.create import UPDATABLE_FIELDS
from tasks.models import Task, TaskInput, TaskTransition
from tasks.selectors import task_job_counts
from wms.api import StrictFieldsMixin


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
    "data_in_selection",
    "data_in_follow",
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


class TaskInputSerializer(serializers.ModelSerializer):
    """One input dataset of the task's series: its place, its uid, and how far the splitter
    got (``split_cursor``: the DSM id of the last file given a job; ``split_done_at``: when the
    dataset was found closed with every file given a job)."""

    class Meta:
        model = TaskInput
        fields = ["position", "dataset_uid", "split_cursor", "split_done_at"]
        read_only_fields = fields


class TaskDetailSerializer(TaskSerializer):
    """A task with its job counts, its input datasets in order and the history of its states."""

    inputs = TaskInputSerializer(many=True, read_only=True)
    transitions = TaskTransitionSerializer(many=True, read_only=True)

    class Meta(TaskSerializer.Meta):
        fields = [*TASK_FIELDS, "inputs", "transitions"]
        read_only_fields = fields


class TaskInputsField(serializers.ListField):
    """A list of dataset uids (the service checks each against the DSM)."""

    child = serializers.UUIDField()


MAX_INPUTS_PER_REQUEST = 1000


def _uids_field() -> TaskInputsField:
    return TaskInputsField(
        required=False,
        min_length=1,
        max_length=MAX_INPUTS_PER_REQUEST,
        help_text="Input datasets, in the order they are read "
        f"(at most {MAX_INPUTS_PER_REQUEST:,} in one request).",
    )


def _selection_field() -> serializers.CharField:
    return serializers.CharField(
        required=False,
        max_length=255,
        help_text="A name pattern of input datasets (glob: * any run, ? one character).",
    )


def _one_input_way(data: Any, fields: tuple[str, ...]) -> dict[str, list[str]]:
    """The errors of a request naming its input datasets in none or several of ``fields``
    (only the shape: whether the datasets exist is the service's question, to the DSM)."""
    if not hasattr(data, "get"):
        return {}
    given = [f for f in fields if data.get(f) not in (None, "", [])]
    if not given:
        return {fields[0]: [f"This field is required (or {' or '.join(fields[1:])})."]}
    if len(given) > 1:
        return {f: [f"Give only one of {', '.join(fields)}."] for f in given}
    return {}


class TaskCreateSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """What a user gives to define a task; the owner is the user who asks.

    The input datasets, given ONE way: ``data_in_uid`` (one dataset), ``data_in_uids`` (a
    series, read in this order) or ``data_in_selection`` (a name pattern, ``*`` and ``?`` as
    wildcards, resolved at once into the datasets it matches, in name order). Every dataset
    must exist in the DSM; it may be open and still empty.
    """

    data_in_uid = serializers.UUIDField(required=False, allow_null=True)
    data_in_uids = _uids_field()
    data_in_selection = _selection_field()

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
            "data_in_uids",
            "data_in_selection",
            "data_in_follow",
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
        extra_kwargs = {
            "data_out_url": {
                "help_text": "Where the task's outputs go: a place of the task's own inside the "
                "owner's folder of the output root, `<WMS_OUTPUT_ROOT>/<username>/...`, "
                "overlapping no other task's (else 400 naming data_out_url). Empty: "
                "`<WMS_OUTPUT_ROOT>/<username>/task-<id>`. Stored in canonical form."
            }
        }

    def to_internal_value(self, data: Any) -> Any:
        return _with_input_errors(
            super().to_internal_value, data, ("data_in_uid", "data_in_uids", "data_in_selection")
        )


class TaskAddInputsSerializer(StrictFieldsMixin, serializers.Serializer):
    """Datasets to append to a task's series: ``data_in_uids`` or ``data_in_selection``."""

    data_in_uids = _uids_field()
    data_in_selection = _selection_field()

    def to_internal_value(self, data: Any) -> Any:
        return _with_input_errors(
            super().to_internal_value, data, ("data_in_uids", "data_in_selection")
        )


def _with_input_errors(parse: Any, data: Any, fields: tuple[str, ...]) -> Any:
    """``parse(data)`` with the input-choice errors reported together with any other."""
    errors = _one_input_way(data, fields)
    try:
        value = parse(data)
    except serializers.ValidationError as exc:
        if not isinstance(exc.detail, dict):
            raise
        raise serializers.ValidationError({**errors, **exc.detail}) from exc
    if errors:
        raise serializers.ValidationError(errors)
    return value


class TaskUpdateSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """The fields of a task that may change at run time (PATCH); any other field is a 400."""

    unknown_field_message = "This field cannot be changed."

    class Meta:
        model = Task
        fields = list(UPDATABLE_FIELDS)
