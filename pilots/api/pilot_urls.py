"""URLs of the pilot protocol's pilot endpoints (docs/pilot-api.md), under /api/v1/."""

from django.urls import path

from pilots.api.pilot_views import (
    PilotEventsView,
    PilotHeartbeatView,
    PilotRegisterView,
    PilotStartsView,
    PilotTerminateView,
)

urlpatterns = [
    path("pilots/register/", PilotRegisterView.as_view(), name="pilot-register"),
    path("pilots/<int:pilot_id>/heartbeat/", PilotHeartbeatView.as_view(), name="pilot-heartbeat"),
    path("pilots/<int:pilot_id>/terminate/", PilotTerminateView.as_view(), name="pilot-terminate"),
    path("pilots/<int:pilot_id>/events/", PilotEventsView.as_view(), name="pilot-events"),
    path("pilots/<int:pilot_id>/starts/", PilotStartsView.as_view(), name="pilot-starts"),
]
