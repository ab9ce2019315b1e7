"""Tasks API: define, list, inspect, re-prioritise, pause, resume and cancel tasks.

Ownership: a user sees and acts on their own tasks only; staff see and act on every task.
Another user's task answers **404** ``not_found``, exactly as a task that does not exist, so the
API never tells whether someone else's task id exists. (The jobs and files APIs follow the
same rule through the task they belong to.)

Views are thin: they validate input with a serializer, call one service (``tasks.create``,
``tasks.inputs``, ``tasks.lifecycle``) with the validated data, and render the result with
``tasks.selectors``' job counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tasks.api.filters import TaskFilter
from tasks.api.serializers import (
    TaskAddInputsSerializer,
    TaskCreateSerializer,
    TaskDetailSerializer,
    TaskSerializer,
    TaskUpdateSerializer,
)
from tasks.create import task_create, task_update
from tasks.inputs import task_add_inputs
from tasks.lifecycle import task_cancel, task_pause, task_resume, task_retry_failed
from tasks.models import Task
from tasks.selectors import tasks_job_counts, tasks_visible_to
from wms.api import (
    PageNumberPagination,
    StableOrderingFilter,
    TransitionReasonSerializer,
    error_responses,
    transition_reason,
)
from wms.choices import TransitionSource

_ACTION_DOC = {
    "pause": "Pause the task (defined or running → paused): the executor stops dispatching "
    "its jobs. Pausing a paused task is a no-op (200, no new transition).",
    "resume": "Resume the task (paused → running). Resuming a running task is a no-op "
    "(200, no new transition).",
    "cancel": "Cancel the task and every job of it that is not final yet. Cancelling a "
    "cancelled task is a no-op (200); a finished or failed task answers 409.",
    "retry": "Retry the task's failed jobs: each goes back to defined with one more retry "
    "allowed (its attempts are kept); a finished or failed task goes back to running. No "
    "failed job: a no-op (200). A cancelled task answers 409.",
}


def _action_schema(verb: str) -> Callable[[Any], Any]:
    return extend_schema(
        summary=f"{verb.capitalize()} a task",
        description=_ACTION_DOC[verb],
        request=TransitionReasonSerializer,
        responses={200: TaskDetailSerializer, **error_responses(400, 404, 409)},
    )


@extend_schema(tags=["tasks"])
@extend_schema_view(
    list=extend_schema(
        summary="List tasks",
        description="The user's tasks (every task for staff), newest first, page by page, "
        "each with its jobs counted per state.",
        responses={200: TaskSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(
        summary="Show a task",
        description="One task with its jobs counted per state and its state history.",
        responses={200: TaskDetailSerializer, **error_responses(404)},
    ),
    create=extend_schema(
        summary="Define a task",
        description="Define a task over input datasets of the DSM, named one way: "
        "data_in_uid (one), data_in_uids (a series, read in order) or data_in_selection (a "
        "name pattern, resolved now into the datasets it matches, in name order). Datasets may "
        "be open and still empty: the task follows them as files arrive and ends only once "
        "every one is closed and fully processed. The owner is the caller.",
        request=TaskCreateSerializer,
        responses={201: TaskDetailSerializer, **error_responses(400)},
    ),
    partial_update=extend_schema(
        summary="Change a task",
        description="Change rank, name, max_retries, max_failed_fraction, splitter_enabled, "
        "data_in_follow (false: stop following the selection, after one last look), "
        "executor_enabled or the merge settings (merge_group_size and merge_max_level only "
        "while the task has no merge job); "
        "any other field answers 400. A new rank also applies to the task's jobs not "
        "dispatched yet.",
        request=TaskUpdateSerializer,
        responses={200: TaskDetailSerializer, **error_responses(400, 404)},
    ),
)
class TaskViewSet(viewsets.GenericViewSet):
    pagination_class = PageNumberPagination
    filter_backends = [DjangoFilterBackend, StableOrderingFilter]
    filterset_class = TaskFilter
    ordering_fields = ["id", "name", "rank", "state", "created_at", "updated_at"]
    ordering = ["-id"]
    serializer_classes = {
        "list": TaskSerializer,
        "retrieve": TaskDetailSerializer,
        "create": TaskCreateSerializer,
        "partial_update": TaskUpdateSerializer,
        "pause": TransitionReasonSerializer,
        "resume": TransitionReasonSerializer,
        "cancel": TransitionReasonSerializer,
        "retry": TransitionReasonSerializer,
        "inputs": TaskAddInputsSerializer,
    }

    def get_serializer_class(self) -> type:
        return self.serializer_classes.get(self.action, TaskSerializer)

    def get_queryset(self) -> QuerySet[Task]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return Task.objects.none()
        queryset = tasks_visible_to(user=self.request.user).select_related("owner")
        if self.action == "retrieve":
            queryset = queryset.prefetch_related("inputs", "transitions")
        return queryset

    def _detail(self, task_id: int, http_status: int = status.HTTP_200_OK) -> Response:
        task = (
            Task.objects.select_related("owner")
            .prefetch_related("inputs", "transitions")
            .get(pk=task_id)
        )
        data = TaskDetailSerializer(task, context=self.get_serializer_context()).data
        return Response(data, status=http_status)

    def list(self, request: Request) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        rows = list(queryset) if page is None else page
        # The job counts of the whole page in one query: no N+1.
        context = {
            **self.get_serializer_context(),
            "job_counts": tasks_job_counts(task_ids=[t.pk for t in rows]),
        }
        data = TaskSerializer(rows, many=True, context=context).data
        return Response(data) if page is None else self.get_paginated_response(data)

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(self.get_serializer(self.get_object()).data)

    def create(self, request: Request) -> Response:
        serializer = TaskCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        # IsAuthenticated let the request in: the user is a real account.
        owner = cast(User, request.user)
        task = task_create(owner=owner, **serializer.validated_data)
        return self._detail(task.pk, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        task = self.get_object()
        serializer = TaskUpdateSerializer(
            data=request.data, partial=True, context=self.get_serializer_context()
        )
        serializer.is_valid(raise_exception=True)
        task_update(task_id=task.pk, **serializer.validated_data)
        return self._detail(task.pk)

    def _transition(self, request: Request, service: Callable[..., Any], verb: str) -> Response:
        task = self.get_object()
        service(
            task_id=task.pk, source=TransitionSource.API, reason=transition_reason(request, verb)
        )
        return self._detail(task.pk)

    @_action_schema("pause")
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, task_pause, "pause")

    @_action_schema("resume")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, task_resume, "resume")

    @_action_schema("cancel")
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, task_cancel, "cancel")

    @_action_schema("retry")
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, task_retry_failed, "retry")

    @extend_schema(
        summary="Add input datasets to a task",
        description="Append datasets to the task's series of inputs: data_in_uids (in order) "
        "or data_in_selection (a name pattern; datasets already in the series are skipped). "
        "Only while the task is defined, running or paused (else 409); a dataset already in "
        "the series, an unknown one or a pattern matching nothing is a 400.",
        request=TaskAddInputsSerializer,
        responses={201: TaskDetailSerializer, **error_responses(400, 404, 409)},
    )
    @action(detail=True, methods=["post"])
    def inputs(self, request: Request, pk: str | None = None) -> Response:
        task = self.get_object()
        serializer = TaskAddInputsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        task_add_inputs(task_id=task.pk, **serializer.validated_data)
        return self._detail(task.pk, status.HTTP_201_CREATED)
