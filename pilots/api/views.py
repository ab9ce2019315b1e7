"""Pilots API (user side): read-only list and detail of the pilots, for every authenticated
user. Pilots register, heartbeat and take commands through the pilot-facing API, not here."""

from __future__ import annotations

from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import viewsets

from pilots.api.filters import PilotFilter
from pilots.api.serializers import PilotSerializer
from pilots.models import Pilot
from wms.api import PageNumberPagination, StableOrderingFilter, error_responses


@extend_schema(tags=["pilots"])
@extend_schema_view(
    list=extend_schema(
        summary="List pilots",
        description="Every pilot, newest first, page by page.",
        responses={200: PilotSerializer(many=True), **error_responses(400)},
    ),
    retrieve=extend_schema(
        summary="Show a pilot",
        responses={200: PilotSerializer, **error_responses(404)},
    ),
)
class PilotViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Pilot.objects.all()
    serializer_class = PilotSerializer
    pagination_class = PageNumberPagination
    filter_backends = [DjangoFilterBackend, StableOrderingFilter]
    filterset_class = PilotFilter
    ordering_fields = ["id", "hostname", "site", "state", "last_heartbeat", "created_at"]
    ordering = ["-id"]
