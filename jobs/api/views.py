"""Jobs API (user side): list and inspect the jobs of one's tasks; cancel, hold, release a job
or a set of jobs.

Ownership follows the task: a user sees the jobs of their own tasks, staff see every job;
another user's job answers **404** ``not_found`` (see ``tasks.api.views``), and in a set of jobs
it is an unknown id (400, nothing changes). The list uses cursor pagination (jobs are a big
table). The pilot-facing job API is a separate thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from jobs.api.filters import JobFilter
from jobs.api.serializers import (
    JobDetailSerializer,
    JobsBulkActionResultSerializer,
    JobsBulkActionSerializer,
    JobSerializer,
    id_list,
)
from jobs.control import job_cancel, job_hold, job_release, jobs_cancel, jobs_hold, jobs_release
from jobs.models import Job, JobState
from jobs.selectors import jobs_visible_to
from wms import db
from wms.api import (
    CursorPagination,
    StableOrderingFilter,
    TransitionReasonSerializer,
    error_responses,
    transition_reason,
)
from wms.choices import TransitionSource

_BULK_DESCRIPTION = (
    " in ONE call. Every id must be a job the caller may see (their tasks' jobs; staff: any): "
    'an unknown or another user\'s id answers 400 `{"ids": ["Unknown job ids: 5, 9"]}` and '
    "nothing changes; a repeated id answers 400 too. The answer counts the jobs moved "
    "(`changed`) and lists in `unchanged` those not in the target state after the call; jobs "
    "already in it are a no-op (neither). Each job moved gets one transition row (source "
    "`api`)."
)


@extend_schema(tags=["jobs"])
@extend_schema_view(
    list=extend_schema(
        summary="List jobs",
        description="The jobs of the user's tasks (every job for staff), by cursor.",
        responses={200: JobSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(
        summary="Show a job",
        description="One job with its attempts and its state history.",
        responses={200: JobDetailSerializer, **error_responses(404)},
    ),
)
class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    pagination_class = CursorPagination
    filter_backends = [DjangoFilterBackend, StableOrderingFilter]
    filterset_class = JobFilter
    # Cursor pagination needs an unchanging order key: creation order only.
    ordering_fields = ["id", "created_at"]
    ordering = ["id"]

    def get_serializer_class(self) -> type:
        if self.action == "retrieve":
            return JobDetailSerializer
        if self.action in ("cancel", "hold", "release"):
            return TransitionReasonSerializer
        if self.action in ("bulk_cancel", "bulk_hold", "bulk_release"):
            return JobsBulkActionSerializer
        return JobSerializer

    def get_queryset(self) -> QuerySet[Job]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Job.objects.none()
        queryset = jobs_visible_to(user=self.request.user)
        if self.action == "retrieve":
            queryset = queryset.prefetch_related("attempts", "transitions")
        return queryset

    @extend_schema(
        summary="Cancel a job",
        description="Cancel one job (a running attempt is marked cancelled, with the time its "
        "kill was requested). Cancelling a cancelled job is a no-op (200, no new transition); "
        "a finished or failed job answers 409.",
        request=TransitionReasonSerializer,
        responses={200: JobDetailSerializer, **error_responses(400, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, job_cancel, "cancel")

    @extend_schema(
        summary="Hold a job",
        description="Hold a job not yet running (defined or queued → held): it is not "
        "dispatched, and a pilot's start of a message already queued answers 409. Holding a "
        "held job is a no-op (200); any other state answers 409.",
        request=TransitionReasonSerializer,
        responses={200: JobDetailSerializer, **error_responses(400, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def hold(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, job_hold, "hold")

    @extend_schema(
        summary="Release a job",
        description="Release a held job (held → defined): the executor dispatches it again. "
        "Releasing a defined job is a no-op (200); any other state answers 409.",
        request=TransitionReasonSerializer,
        responses={200: JobDetailSerializer, **error_responses(400, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, job_release, "release")

    def _transition(self, request: Request, service: Any, verb: str) -> Response:
        job = self.get_object()
        service(job_id=job.pk, source=TransitionSource.API, reason=transition_reason(request, verb))
        job = Job.objects.prefetch_related("attempts", "transitions").get(pk=job.pk)
        return Response(JobDetailSerializer(job, context=self.get_serializer_context()).data)

    # --- a set of jobs (list-level routes: the router puts them before /jobs/{id}/) -----------

    @extend_schema(
        summary="Cancel a set of jobs",
        description="Cancel up to 10,000 jobs" + _BULK_DESCRIPTION + " Final jobs (finished, "
        "failed) are left as they are and listed in `unchanged`; running attempts are marked "
        "cancelled and their pilots get a `kill_job` command, as for one job.",
        operation_id="v1_jobs_bulk_cancel_create",
        request=JobsBulkActionSerializer,
        responses={200: JobsBulkActionResultSerializer, **error_responses(400)},
    )
    @action(detail=False, methods=["post"], url_path="cancel", url_name="bulk-cancel")
    def bulk_cancel(self, request: Request) -> Response:
        return self._bulk(request, jobs_cancel, "cancel", JobState.CANCELLED)

    @extend_schema(
        summary="Hold a set of jobs",
        description="Hold up to 10,000 jobs (defined or queued → held)"
        + _BULK_DESCRIPTION
        + " Jobs in any other state than defined, queued or held are listed in `unchanged`.",
        operation_id="v1_jobs_bulk_hold_create",
        request=JobsBulkActionSerializer,
        responses={200: JobsBulkActionResultSerializer, **error_responses(400)},
    )
    @action(detail=False, methods=["post"], url_path="hold", url_name="bulk-hold")
    def bulk_hold(self, request: Request) -> Response:
        return self._bulk(request, jobs_hold, "hold", JobState.HELD)

    @extend_schema(
        summary="Release a set of jobs",
        description="Release up to 10,000 held jobs (held → defined, the executor dispatches "
        "them again)" + _BULK_DESCRIPTION + " Jobs neither held nor defined are listed in "
        "`unchanged`.",
        operation_id="v1_jobs_bulk_release_create",
        request=JobsBulkActionSerializer,
        responses={200: JobsBulkActionResultSerializer, **error_responses(400)},
    )
    @action(detail=False, methods=["post"], url_path="release", url_name="bulk-release")
    def bulk_release(self, request: Request) -> Response:
        return self._bulk(request, jobs_release, "release", JobState.DEFINED)

    def _bulk(
        self, request: Request, service: Callable[..., int], verb: str, target: str
    ) -> Response:
        serializer = JobsBulkActionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        ids: list[int] = serializer.validated_data["ids"]
        who = request.user.get_username()
        reason = serializer.validated_data.get("reason", "").strip()
        reason = f"{reason} (by {who})" if reason else f"{verb} requested by {who}"
        # One transaction: the states read after the service are the ones it left (the rows it
        # moved stay locked until commit; the executor cannot take a released job meanwhile).
        with transaction.atomic():
            visible = set(
                jobs_visible_to(user=request.user)
                .filter(**db.in_values("id", ids))
                .values_list("id", flat=True)
            )
            if len(visible) != len(ids):
                # Unknown and invisible ids look the same: no other user's job is revealed.
                unknown = sorted(set(ids) - visible)
                raise ValidationError({"ids": [f"Unknown job ids: {id_list(unknown)}."]})
            changed = service(job_ids=ids, source=TransitionSource.API, reason=reason)
            unchanged = sorted(
                Job.objects.filter(**db.in_values("id", ids))
                .exclude(state=target)
                .values_list("id", flat=True)
            )
        data = {"requested": len(ids), "changed": changed, "unchanged": unchanged}
        return Response(JobsBulkActionResultSerializer(data).data)
