"""The pilot protocol's job endpoints (docs/pilot-api.md): a pilot starts a job, reports on
it. Thin: validate, call one service, render. Only a pilot's own token is accepted."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from jobs.api.pilot_serializers import (
    JobMessageSerializer,
    JobReportReplySerializer,
    JobReportSerializer,
    JobStartSerializer,
)
from jobs.reports import PreparedEvents, job_report_commit, job_report_prepare
from pilots.api.pilot_views import (
    IDEMPOTENCY_KEY,
    TAGS,
    PilotProtocolView,
    pilot_scope,
)
from pilots.auth import request_pilot
from pilots.protocol import pilot_job_start
from wms.api import error_responses
from wms.idempotency import idempotent


class JobStartView(PilotProtocolView):
    @extend_schema(
        tags=TAGS,
        summary="A pilot starts a job",
        description="The atomic claim of the job message's attempt: `queued → running` with "
        "this pilot. 200: run the job message returned. 409 (`job_not_queued`, "
        "`stale_attempt`, `wrong_device`, `task_paused`, `pilot_not_live`): drop the message "
        "(a pilot not live puts it back). `task_paused` sent the job back to wait.",
        request=JobStartSerializer,
        responses={200: JobMessageSerializer, **error_responses(400, 404, 409, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope)
    def post(self, request: Request, job_uuid: uuid.UUID) -> Response:
        serializer = JobStartSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        message = pilot_job_start(
            pilot=request_pilot(request),
            job_uuid=job_uuid,
            attempt=serializer.validated_data["attempt"],
        )
        return Response(message.to_dict())


class JobReportView(PilotProtocolView):
    def register_outputs(self, request: Request, job_uuid: uuid.UUID) -> PreparedEvents:
        """The report checked and its files registered in the DSM, before the transaction."""
        serializer = JobReportSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return job_report_prepare(
            pilot_id=request_pilot(request).pk, job_uuid=job_uuid, event=serializer.validated_data
        )

    @extend_schema(
        tags=TAGS,
        summary="A pilot reports on its attempt of a job",
        description="`running`: the attempt's metrics are stored. `finished` / `failed`: the "
        "attempt ends, its files are registered (FILE_DAT and the task's output dataset), the "
        "job finishes, goes back to `defined` for a retry, or fails. The same final report "
        "twice is a `duplicate`; another final report of an attempt a report already ended "
        "(other files, sizes, checksums, URLs, state, exit or error code) is a 409 "
        "`report_conflict`; a report of an attempt no longer running is `ignored`. "
        "403: the attempt is another pilot's.",
        request=JobReportSerializer,
        responses={200: JobReportReplySerializer, **error_responses(400, 404, 409, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope, prepare=register_outputs)
    def post(self, request: Request, job_uuid: uuid.UUID, prepared: PreparedEvents) -> Response:
        outcome = job_report_commit(prepared)
        return Response({"job_state": outcome.job_state, "outcome": outcome.outcome})
