"""Files and datasets API.

- ``/files/``: the FILE_DAT rows (a job's inputs, outputs and logs) of the user's tasks (every
  file for staff), by cursor; another user's file answers 404 like one that does not exist.
- ``/datasets/``: the DSM catalogue, found by ``uid``. Every authenticated user may list and
  read it, and register datasets (the caller becomes their ``owner``). Adding files and
  closing are refused (403 ``permission_denied``) by ``files.api.permissions``: an output
  dataset is written by the WMS only (nobody, staff included, through the API); an input
  dataset by its owner, staff, or a user with the permission ``files.change_dataset``; an
  input dataset without owner by staff or that permission only. Writes go through
  ``files.services`` (``dataset_register``, ``datasets_register``, ``dataset_add_files``,
  ``dataset_close``), each one transaction: all or nothing.
"""

from __future__ import annotations

import uuid
from typing import cast

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from files.api.filters import DatasetFilter, FileFilter
from files.api.permissions import DatasetWritePermission
from files.api.serializers import (
    DatasetBulkCreateSerializer,
    DatasetBulkResultSerializer,
    DatasetCreateSerializer,
    DatasetEntrySerializer,
    DatasetFilesAddedSerializer,
    DatasetFilesAddSerializer,
    DatasetSerializer,
    FileSerializer,
)
from files.models import Dataset, File
from files.selectors import files_visible_to
from files.services import dataset_add_files, dataset_close, dataset_register, datasets_register
from wms.api import (
    CursorPagination,
    ErrorSerializer,
    PageNumberPagination,
    StableOrderingFilter,
    TransitionReasonSerializer,
    error_responses,
    transition_reason,
)
from wms.choices import TransitionSource


@extend_schema(tags=["files"])
@extend_schema_view(
    list=extend_schema(
        summary="List files",
        description="The files of the user's tasks (every file for staff), by cursor.",
        responses={200: FileSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(
        summary="Show a file",
        responses={200: FileSerializer, **error_responses(404)},
    ),
)
class FileViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = FileSerializer
    pagination_class = CursorPagination
    filter_backends = [DjangoFilterBackend, StableOrderingFilter]
    filterset_class = FileFilter
    ordering_fields = ["id", "created_at"]
    ordering = ["id"]

    def get_queryset(self) -> QuerySet[File]:
        if getattr(self, "swagger_fake_view", False):  # schema generation
            return File.objects.none()
        return files_visible_to(user=self.request.user).select_related("dataset")


# The 403 of the dataset writes, with the rules (files.api.permissions).
WRITE_REFUSED = {
    403: OpenApiResponse(
        response=ErrorSerializer,
        description="Not allowed (`permission_denied`): an output dataset is written by the "
        "WMS only (nobody adds files to it or closes it through the API, staff included); an "
        "input dataset only by its owner, staff, or a user with the permission "
        "`files.change_dataset` (an input dataset without owner: staff or that permission "
        "only). Nothing was written.",
    )
}


@extend_schema(tags=["datasets"])
@extend_schema_view(
    list=extend_schema(
        summary="List datasets",
        description="The DSM catalogue's datasets, newest first, page by page.",
        responses={200: DatasetSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(
        summary="Show a dataset",
        responses={200: DatasetSerializer, **error_responses(404)},
    ),
    create=extend_schema(
        summary="Register a dataset",
        description="Register one open dataset; the caller becomes its owner. A name or uid "
        "already taken answers 409.",
        request=DatasetCreateSerializer,
        responses={201: DatasetSerializer, **error_responses(400, 409)},
    ),
)
class DatasetViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Dataset.objects.select_related("owner")
    permission_classes = [permissions.IsAuthenticated, DatasetWritePermission]
    lookup_field = "uid"
    lookup_value_converter = "uuid"  # routed with path converters (see files.api.urls)
    pagination_class = PageNumberPagination
    filter_backends = [DjangoFilterBackend, StableOrderingFilter]
    filterset_class = DatasetFilter
    ordering_fields = ["id", "name", "created_at", "file_count", "total_size"]
    ordering = ["-id"]
    serializer_classes = {
        "create": DatasetCreateSerializer,
        "bulk": DatasetBulkCreateSerializer,
        "files": DatasetEntrySerializer,
        "add_files": DatasetFilesAddSerializer,
        "close": TransitionReasonSerializer,
    }

    def get_serializer_class(self) -> type:
        return self.serializer_classes.get(self.action, DatasetSerializer)

    def _render(self, dataset: Dataset, http_status: int = status.HTTP_200_OK) -> Response:
        return Response(
            DatasetSerializer(dataset, context=self.get_serializer_context()).data,
            status=http_status,
        )

    def create(self, request: Request) -> Response:
        serializer = DatasetCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        dataset = dataset_register(
            **serializer.validated_data, owner=cast(AbstractBaseUser, request.user)
        )
        return self._render(dataset, status.HTTP_201_CREATED)

    @extend_schema(
        summary="Register several datasets at once",
        description="Pre-register several datasets in ONE transaction: all are created, or "
        "none (a name or uid already taken answers 409 and nothing is written). The caller "
        "becomes their owner.",
        request=DatasetBulkCreateSerializer,
        responses={201: DatasetBulkResultSerializer, **error_responses(400, 409)},
    )
    @action(detail=False, methods=["post"])
    def bulk(self, request: Request) -> Response:
        serializer = DatasetBulkCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        created = datasets_register(
            specs=serializer.validated_data["datasets"], owner=cast(AbstractBaseUser, request.user)
        )
        data = DatasetBulkResultSerializer(
            {"datasets": created}, context=self.get_serializer_context()
        ).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="List a dataset's files",
        description="The files of the dataset's DSM catalogue, by cursor.",
        responses={200: DatasetEntrySerializer(many=True), **error_responses(404)},
    )
    @action(
        detail=True,
        methods=["get"],
        pagination_class=CursorPagination,
        filter_backends=[],
    )
    def files(self, request: Request, uid: uuid.UUID | None = None) -> Response:
        dataset = self.get_object()
        page = self.paginate_queryset(dataset.entries.order_by("id"))
        data = DatasetEntrySerializer(page, many=True, context=self.get_serializer_context()).data
        return self.get_paginated_response(data)

    @extend_schema(
        summary="Register files in a dataset",
        description="Register files in an open input dataset's catalogue, all or none: its "
        "owner, staff, or a user with the permission `files.change_dataset` (an output "
        "dataset, or another user's, answers 403). A closed "
        'dataset answers 409 `{"error": "dataset_closed"}`; a name already in the dataset '
        "answers 409 `conflict`.",
        request=DatasetFilesAddSerializer,
        responses={
            201: DatasetFilesAddedSerializer,
            **error_responses(400, 404, 409),
            **WRITE_REFUSED,
        },
    )
    @files.mapping.post
    def add_files(self, request: Request, uid: uuid.UUID | None = None) -> Response:
        dataset = self.get_object()
        serializer = DatasetFilesAddSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        entries = dataset_add_files(dataset=dataset, files=serializer.validated_data["files"])
        data = DatasetFilesAddedSerializer(
            {"dataset": dataset.uid, "added": len(entries), "files": entries},
            context=self.get_serializer_context(),
        ).data
        return Response(data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Close a dataset",
        description="Close the input dataset (open → closed): it takes no more files. Its "
        "owner, staff, or a user with the permission `files.change_dataset` (an output "
        "dataset, closed by the WMS when its task ends, or another user's, answers 403). "
        "Closing a closed dataset is a no-op (200, no new transition).",
        request=TransitionReasonSerializer,
        responses={200: DatasetSerializer, **error_responses(400, 404, 409), **WRITE_REFUSED},
    )
    @action(detail=True, methods=["post"])
    def close(self, request: Request, uid: uuid.UUID | None = None) -> Response:
        dataset = self.get_object()
        dataset_close(
            dataset=dataset,
            source=TransitionSource.API,
            reason=transition_reason(request, "close"),
        )
        return self._render(Dataset.objects.get(pk=dataset.pk))
