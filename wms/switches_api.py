"""API of the run-time switches: ``GET /api/v1/switches/``, ``PATCH /api/v1/switches/{name}/``.

Every authenticated user may read them; only staff may switch the splitter or the executor
off and on (it affects every task). Per-task switches are the task's own
``splitter_enabled`` / ``executor_enabled`` (``PATCH /api/v1/tasks/{id}/``).
"""

from __future__ import annotations

from django.urls import path
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from wms.api import StrictFieldsMixin, error_responses
from wms.exceptions import NotFound
from wms.models import Switch
from wms.switches import SERVICES, switch_enabled, switch_set


class SwitchSerializer(serializers.Serializer):
    name = serializers.ChoiceField(choices=SERVICES, read_only=True)
    enabled = serializers.BooleanField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)
    updated_by = serializers.CharField(read_only=True)
    last_run_at = serializers.DateTimeField(read_only=True, allow_null=True)


class SwitchInputSerializer(StrictFieldsMixin, serializers.Serializer):
    enabled = serializers.BooleanField()


def _as_dict(name: str) -> dict:
    row = Switch.objects.filter(pk=name).first()
    return {
        "name": name,
        "enabled": switch_enabled(name),
        "updated_at": row.updated_at if row else None,
        "updated_by": row.updated_by if row else "",
        "last_run_at": row.last_run_at if row else None,
    }


class IsStaffForWrites(permissions.BasePermission):
    message = "Only operators (staff) may switch a service for every task."

    def has_permission(self, request, view) -> bool:
        return request.method in permissions.SAFE_METHODS or bool(request.user.is_staff)


@extend_schema(tags=["switches"])
class SwitchListView(APIView):
    @extend_schema(
        summary="List the service switches",
        responses={200: SwitchSerializer(many=True), **error_responses(401)},
    )
    def get(self, request):
        return Response(SwitchSerializer([_as_dict(n) for n in SERVICES], many=True).data)


@extend_schema(tags=["switches"])
class SwitchDetailView(APIView):
    permission_classes = [permissions.IsAuthenticated, IsStaffForWrites]

    @extend_schema(
        summary="Show a service switch",
        responses={200: SwitchSerializer, **error_responses(401, 404)},
    )
    def get(self, request, name: str):
        if name not in SERVICES:
            raise NotFound(f"No service {name!r}; services are {', '.join(SERVICES)}.")
        return Response(SwitchSerializer(_as_dict(name)).data)

    @extend_schema(
        summary="Switch a service on or off for every task",
        description="Takes effect at the next beat cycle, without a restart. Staff only.",
        request=SwitchInputSerializer,
        responses={200: SwitchSerializer, **error_responses(400, 401, 403, 404)},
    )
    def patch(self, request, name: str):
        if name not in SERVICES:
            raise NotFound(f"No service {name!r}; services are {', '.join(SERVICES)}.")
        body = SwitchInputSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        switch_set(
            name=name, enabled=body.validated_data["enabled"], by=request.user.get_username()
        )
        return Response(SwitchSerializer(_as_dict(name)).data)


urlpatterns = [
    path("switches/", SwitchListView.as_view(), name="switch-list"),
    path("switches/<str:name>/", SwitchDetailView.as_view(), name="switch-detail"),
]
