"""Jobs API (user side): list and inspect the jobs of one's tasks; cancel, hold, release a job.

Ownership follows the task: a user sees the jobs of their own tasks, staff see every job;
another user's job answers **404** ``not_found`` (see ``tasks.api.views``). The list uses cursor
pagination (jobs are a big table). The pilot-facing job API is a separate thing.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from jobs.api.filters import JobFilter
from jobs.api.serializers import JobDetailSerializer, JobSerializer
from jobs.models import Job
from jobs.selectors import jobs_visible_to
from jobs.services import job_cancel, job_hold, job_release
from wms.api import (
    CursorPagination,
    StableOrderingFilter,
    TransitionReasonSerializer,
    error_responses,
    transition_reason,
)
from wms.choices import TransitionSource


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
