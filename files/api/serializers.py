"""Serializers of the files and datasets API: read shapes and validated input.

They never write: the views hand ``validated_data`` to ``files.services``. Lengths come from
the models, so input that passes here fits the columns.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from files.models import Dataset, DatasetEntry, DatasetRole, File
from wms import checksums
from wms.api import StrictFieldsMixin

# The biggest value a PositiveBigIntegerField column holds.
_MAX_SIZE = 2**63 - 1
MAX_FILES_PER_REQUEST = 10_000
MAX_DATASETS_PER_REQUEST = 1_000


def _max_length(model: type, field: str) -> int:
    return model._meta.get_field(field).max_length  # type: ignore[attr-defined]


class FileSerializer(serializers.ModelSerializer):
    """A job's input, output or log file (the seed's FILE_DAT row).

    Mapping to the seed's columns: ``id`` is FILE_DAT.file_id and ``job`` is job_id;
    ``file_name``, ``type``, ``size``, ``status``, ``check_sum``, ``time_start`` and ``time_end``
    keep their seed names (``check_sum`` is ``<algorithm>:<hex>`` of the content, not the
    seed's uuid). The seed's file_in_id / file_out_id / file_log_id are on the job
    (``file_in``, ``file_out``, ``file_log``). ``dataset`` is the DSM uid of the dataset the
    file belongs to and ``entry`` the id of the catalogue entry an input file reads.
    """

    dataset: serializers.SlugRelatedField[Dataset] = serializers.SlugRelatedField(
        slug_field="uid", read_only=True, allow_null=True
    )

    class Meta:
        model = File
        fields = [
            "id",
            "file_name",
            "type",
            "size",
            "status",
            "intermediate",
            "check_sum",
            "time_start",
            "time_end",
            "job",
            "task",
            "dataset",
            "entry",
            "url",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class DatasetSerializer(serializers.ModelSerializer):
    """A dataset of the DSM catalogue, found by its ``uid`` (what a task's ``data_in_uid`` and
    ``data_out_uid`` hold). Open datasets take files; closed ones are complete. ``owner`` is
    the user who registered it (null for the datasets the WMS made, a task's output among
    them): an input dataset takes files and is closed through the API by its owner, staff or a
    user with the permission ``files.change_dataset``; an output dataset by the WMS only."""

    owner_username = serializers.CharField(
        source="owner.get_username", read_only=True, allow_null=True
    )

    class Meta:
        model = Dataset
        fields = [
            "uid",
            "name",
            "role",
            "state",
            "file_count",
            "total_size",
            "location",
            "owner",
            "owner_username",
            "created_at",
            "updated_at",
            "state_changed_at",
            "closed_at",
        ]
        read_only_fields = fields


class DatasetEntrySerializer(serializers.ModelSerializer):
    """One file in a dataset's DSM catalogue (not a FILE_DAT row: see ``File``)."""

    class Meta:
        model = DatasetEntry
        fields = ["id", "name", "size", "check_sum", "url", "created_at"]
        read_only_fields = fields


class DatasetCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    """A dataset to register: a unique name, its role, where its files live, and optionally
    the uid it already has in the DSM (one is made up otherwise)."""

    name = serializers.CharField(
        max_length=_max_length(Dataset, "name"),
        help_text="Unique. Names ending in `.out` (or `.out.r<n>`) are reserved for the "
        "output datasets the WMS makes (400).",
    )
    role = serializers.ChoiceField(
        choices=DatasetRole.choices,
        default=DatasetRole.INPUT,
        help_text="input (the only role a user registers: output datasets are made by the "
        "WMS, one per task).",
    )
    location = serializers.CharField(
        max_length=_max_length(Dataset, "location"), allow_blank=True, default=""
    )
    uid = serializers.UUIDField(required=False)

    def validate_role(self, value: str) -> str:
        if value != DatasetRole.INPUT:
            raise serializers.ValidationError(
                "Only input datasets are registered through the API: the WMS makes each "
                "task's output dataset itself."
            )
        return value


class DatasetBulkCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    """Several datasets to pre-register at once: all are created, or none."""

    datasets = serializers.ListField(
        child=DatasetCreateSerializer(),
        min_length=1,
        max_length=MAX_DATASETS_PER_REQUEST,
    )


class DatasetBulkResultSerializer(serializers.Serializer):
    """The datasets a bulk registration created, in the order they were given."""

    datasets = DatasetSerializer(many=True)


class DatasetEntryCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    """One file to put in a dataset's catalogue."""

    name = serializers.CharField(max_length=_max_length(DatasetEntry, "name"))
    size = serializers.IntegerField(min_value=0, max_value=_MAX_SIZE, default=0)
    check_sum = serializers.CharField(
        max_length=_max_length(DatasetEntry, "check_sum"),
        allow_blank=True,
        default="",
        help_text="`adler32:<8 hex>`, `sha256:<64 hex>` or `md5:<32 hex>`, lower case.",
    )
    url = serializers.CharField(
        max_length=_max_length(DatasetEntry, "url"),
        allow_blank=True,
        default="",
        help_text="Where the file lives: under one of the deployment's storage roots "
        "(`WMS_STORAGE_ROOTS`), compared in canonical form; else 400 naming `files[i].url`.",
    )

    def validate_check_sum(self, value: str) -> str:
        if value and not checksums.is_valid(value):
            raise serializers.ValidationError("Must be '<adler32|sha256|md5>:<hex>' in lower case.")
        return value


class DatasetFilesAddSerializer(StrictFieldsMixin, serializers.Serializer):
    """Files to register in an open dataset, all or none."""

    files = serializers.ListField(
        child=DatasetEntryCreateSerializer(),
        min_length=1,
        max_length=MAX_FILES_PER_REQUEST,
    )

    def validate_files(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = [f["name"] for f in value]
        if len(set(names)) != len(names):
            raise serializers.ValidationError("File names repeat within the request.")
        return value


class DatasetFilesAddedSerializer(serializers.Serializer):
    """What a registration of files added to a dataset."""

    dataset = serializers.UUIDField(help_text="The dataset's uid.")
    added = serializers.IntegerField(help_text="How many files were registered.")
    files = DatasetEntrySerializer(many=True)
