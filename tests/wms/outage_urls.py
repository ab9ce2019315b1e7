"""A URLconf for tests/wms/test_outages.py: the project's, plus views that meet a real outage
(a database or a broker on a port nobody listens on) or a bug, under /api/ and outside it."""

from __future__ import annotations

from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls import handler400, handler403, handler404, handler500, urlpatterns
from devtools.stack import free_port
from wms import bus
from wms.contract import Command

__all__ = ["handler400", "handler403", "handler404", "handler500", "urlpatterns"]


def unreachable_database() -> None:
    """Connect to the test database's server on a port nobody listens on."""
    wrapper_class = type(connections["default"])
    config = {**connections["default"].settings_dict, "PORT": str(free_port())}
    wrapper_class(config, alias="unreachable").ensure_connection()


def database_view(request: HttpRequest) -> HttpResponse:
    unreachable_database()
    return HttpResponse("unreachable")


def broker_view(request: HttpRequest) -> HttpResponse:
    """kombu's own error (not wrapped in BrokerError), as Celery's ``send_task`` raises it."""
    conn = bus.new_connection(connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=0)
    finally:
        conn.release()
    return HttpResponse("reachable")


def bug_view(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("secret connection string")


class DatabaseApiView(APIView):
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        unreachable_database()
        return Response({})


class BrokerApiView(APIView):
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        bus.publish_commands([Command(id="1", pilot_id=1, command="drain")])
        return Response({})


urlpatterns = [
    path("api/test/database/", database_view),
    path("api/test/broker/", broker_view),
    path("api/test/bug/", bug_view),
    path("api/test/drf-database/", DatabaseApiView.as_view()),
    path("api/test/drf-broker/", BrokerApiView.as_view()),
    path("test/bug/", bug_view),
    path("test/database/", database_view),
    *urlpatterns,
]
