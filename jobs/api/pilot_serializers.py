"""Serializers of the pilot protocol's job endpoints (docs/pilot-api.md): start and report.

Input serializers validate the shape; ``jobs.start`` / ``jobs.reports`` check the rest (the
same checks for the REST report, the bulk events endpoint and the bus).
"""

from __future__ import annotations

from rest_framework import serializers

from jobs.events import (
    CHECKSUM_MESSAGE,
    EVENT_STATES,
    MAX_ERROR_CODE,
    MAX_ERROR_MESSAGE,
    MAX_ID,
    MAX_INT32,
    MAX_NAME,
    MAX_OUTPUTS,
    MAX_SIZE,
    MAX_URL,
    OUTCOMES,
    OUTPUT_TYPES,
)
from wms import checksums
from wms.api import StrictFieldsMixin
from wms.choices import DeviceType, Mode
from wms.contract import VERSION


class JobStartSerializer(StrictFieldsMixin, serializers.Serializer):
    attempt = serializers.IntegerField(
        min_value=0, max_value=32767, help_text="The `attempt` of the job message."
    )


class JobMessageInputSerializer(serializers.Serializer):
    """One input file of a job message."""

    name = serializers.CharField()
    dataset_uid = serializers.CharField()
    url = serializers.CharField(allow_blank=True)
    size = serializers.IntegerField()
    check_sum = serializers.CharField(allow_blank=True)


class JobMessageSerializer(serializers.Serializer):
    """The job message (``wms.contract.JobMessage``): what the pilot runs."""

    v = serializers.IntegerField()
    kind = serializers.CharField()
    job_uuid = serializers.UUIDField()
    attempt = serializers.IntegerField()
    task_id = serializers.IntegerField()
    executable = serializers.CharField()
    args = serializers.CharField(allow_blank=True)
    device_type = serializers.ChoiceField(choices=DeviceType.choices)
    mode = serializers.ChoiceField(choices=Mode.choices)
    rank = serializers.IntegerField()
    inputs = JobMessageInputSerializer(many=True)
    output_url = serializers.CharField(allow_blank=True)
    output_dataset_uid = serializers.CharField(allow_blank=True)
    server_url = serializers.CharField()


class JobOutputFileSerializer(StrictFieldsMixin, serializers.Serializer):
    """A file the attempt wrote: an output, or its log."""

    name = serializers.CharField(max_length=MAX_NAME)
    type = serializers.ChoiceField(choices=list(OUTPUT_TYPES), default="output")
    size = serializers.IntegerField(min_value=0, max_value=MAX_SIZE, default=0)
    check_sum = serializers.CharField(
        max_length=80, allow_blank=True, default="", help_text="`adler32:<8 hex>` or `sha256:…`"
    )

    def validate_check_sum(self, value: str) -> str:
        if value and not checksums.is_valid(value):
            raise serializers.ValidationError(CHECKSUM_MESSAGE)
        return value

    url = serializers.CharField(max_length=MAX_URL, allow_blank=True, default="")


class JobReportSerializer(StrictFieldsMixin, serializers.Serializer):
    """A pilot's report on one attempt (``wms.contract.StatusEvent``). ``v``, ``kind``,
    ``job_uuid``, ``pilot_id`` and ``sent_at`` may be sent as the contract has them; the
    job is the URL's and the pilot the caller."""

    attempt = serializers.IntegerField(min_value=0, max_value=32767)
    state = serializers.ChoiceField(choices=list(EVENT_STATES))
    exit_code = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=-MAX_INT32, max_value=MAX_INT32
    )
    error_code = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_ERROR_CODE, default=""
    )
    error_message = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=MAX_ERROR_MESSAGE,
        default="",
        trim_whitespace=False,
    )
    metrics = serializers.DictField(required=False, default=dict)
    outputs = serializers.ListField(
        child=JobOutputFileSerializer(), required=False, max_length=MAX_OUTPUTS
    )
    v = serializers.IntegerField(required=False, min_value=VERSION, max_value=VERSION)
    kind = serializers.ChoiceField(choices=["event"], required=False)
    job_uuid = serializers.UUIDField(required=False)
    pilot_id = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    sent_at = serializers.CharField(required=False, allow_blank=True, max_length=64)


class JobReportReplySerializer(serializers.Serializer):
    job_state = serializers.CharField(help_text="The job's state after the report.")
    outcome = serializers.ChoiceField(
        choices=list(OUTCOMES),
        help_text="applied; duplicate (the same final report again: nothing changed); "
        "ignored (an attempt that is no longer running: nothing changed).",
    )
