"""The pilot protocol's pilot endpoints (docs/pilot-api.md): register, heartbeat, terminate,
bulk events. Thin: validate, call one service, render.

Registration takes a *user* token with the permission ``pilots.add_pilot``; every other call
takes the pilot's own token (``Authorization: Pilot <token>``) and only for its own id.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.reports import PreparedEvents, job_events_commit, job_events_prepare
from pilots.api.pilot_serializers import (
    PilotEventsReplySerializer,
    PilotEventsSerializer,
    PilotHeartbeatReplySerializer,
    PilotHeartbeatSerializer,
    PilotRegisterSerializer,
    PilotRegistrationSerializer,
    PilotStartsReplySerializer,
    PilotStartsSerializer,
    PilotTerminatedSerializer,
    PilotTerminateSerializer,
)
from pilots.auth import (
    CanRegisterPilots,
    IsPilot,
    PilotTokenAuthentication,
    pilot_bus_key,
    registration_token,
    request_pilot,
)
from pilots.protocol import pilot_starts_answer
from pilots.services import (
    hash_token,
    pilot_heartbeat,
    pilot_register,
    pilot_source,
    pilot_terminate,
)
from wms import bus
from wms.api import error_responses
from wms.idempotency import idempotent, request_key

TAGS = ["pilot protocol"]


def pilot_scope(request: Request) -> str:
    """Whose idempotency keys a pilot's call is compared with: its own."""
    return f"pilot:{request_pilot(request).pk}"


def registrar_scope(request: Request) -> str:
    """Whose idempotency keys a registration is compared with: the registering user's."""
    return f"user:{request.user.pk}"


SECRETS = ("token", "bus_key")


def registration_stored(request: Request, data: Any) -> Any:
    """A registration's answer as it is remembered: without its secrets."""
    return {k: v for k, v in data.items() if k not in SECRETS}


def registration_replayed(request: Request, data: Any) -> Any:
    """A remembered registration's answer with its secrets again: the token is derived from
    the call's key (:func:`pilots.auth.registration_token`), the bus key from the token."""
    key = request_key(request)
    assert key is not None  # only a call with a key is replayed
    token = registration_token(scope=registrar_scope(request), key=key)
    bus_key = pilot_bus_key(pilot_id=data["pilot_id"], token_hash=hash_token(token))
    return {**data, "token": token, "bus_key": bus_key}


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="The call's own key (a uuid4), the same in every retry of the call: a call "
    "sent again gets the first answer again (header `Idempotent-Replayed: true`) and changes "
    "nothing a second time. 8 to 64 of `A-Z a-z 0-9 _ . : -` (else 400 "
    "`invalid_idempotency_key`); the same key with another call: 422 `idempotency_key_reused`.",
)


class PilotProtocolView(APIView):
    """A call of a pilot with its own token, about itself."""

    authentication_classes = [PilotTokenAuthentication]
    permission_classes = [IsPilot]


class PilotRegisterView(APIView):
    permission_classes = [CanRegisterPilots]

    @extend_schema(
        tags=TAGS,
        summary="Register a pilot",
        description="A user with the permission `pilots.add_pilot` (staff and superusers have "
        "it) registers a pilot. The answer carries the pilot's own token and its bus key (to "
        "sign the status events it publishes), shown this once, and where it finds its work "
        "on the bus.",
        request=PilotRegisterSerializer,
        responses={201: PilotRegistrationSerializer, **error_responses(400, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(registrar_scope, stored=registration_stored, replayed=registration_replayed)
    def post(self, request: Request) -> Response:
        serializer = PilotRegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = request_key(request)
        pilot, token = pilot_register(
            **serializer.validated_data,
            registered_by=request.user.get_username(),
            # with a key, a token the replay of this call can give again without storing it
            token=registration_token(scope=registrar_scope(request), key=key) if key else None,
        )
        topology = bus.topology()
        body = {
            "pilot_id": pilot.pk,
            "token": token,
            "bus_key": pilot_bus_key(pilot_id=pilot.pk, token_hash=str(pilot.token_hash)),
            "device_type": pilot.device_type,
            "job_queue": topology.job_queue_name(pilot.device_type),
            "command_queue": topology.command_queue(pilot.pk).name,
            "bus_prefix": topology.prefix,
            "queue_type": topology.queue_type,
            "heartbeat_interval": settings.WMS_HEARTBEAT_INTERVAL,
        }
        return Response(PilotRegistrationSerializer(body).data, status=status.HTTP_201_CREATED)


class PilotHeartbeatView(PilotProtocolView):
    @extend_schema(
        tags=TAGS,
        summary="Heartbeat of a pilot",
        description="The pilot is alive: its state (the first heartbeat moves it from "
        "`registered` to `idle`), status, metrics and the metrics of the attempts it runs are "
        "stored, the commands it acknowledges are marked so; a `lost` pilot heard from again "
        "is live again. The attempts it names (`jobs`, `reporting`) are reconciled: its "
        "attempts the reaper ended are reclaimed while their job has not started again, and "
        "an attempt that is no longer its own gets a `kill_job` command in this answer. The "
        "answer carries the commands not delivered yet, each once (they are also published "
        "to the pilot's command queue).",
        request=PilotHeartbeatSerializer,
        responses={200: PilotHeartbeatReplySerializer, **error_responses(400, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope)
    def post(self, request: Request, pilot_id: int) -> Response:
        serializer = PilotHeartbeatSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        reply = pilot_heartbeat(pilot_id=request_pilot(request).pk, **serializer.validated_data)
        body = {
            "commands": [
                {
                    "id": c.id,
                    "command": c.command,
                    "job_uuid": c.job_uuid,
                    "attempt": c.attempt,
                    "reason": c.reason,
                }
                for c in reply.commands
            ],
            "heartbeat_interval": reply.heartbeat_interval,
            "state": reply.state,
        }
        return Response(PilotHeartbeatReplySerializer(body).data)


class PilotTerminateView(PilotProtocolView):
    @extend_schema(
        tags=TAGS,
        summary="A pilot exits",
        description="The pilot becomes `terminated`; its running attempts, if any, fail with "
        "error code `pilot_terminated` (their jobs are retried or failed). Terminating a "
        "terminated pilot again is a no-op; a lost pilot answers 409.",
        request=PilotTerminateSerializer,
        responses={200: PilotTerminatedSerializer, **error_responses(400, 409, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope)
    def post(self, request: Request, pilot_id: int) -> Response:
        serializer = PilotTerminateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        pilot = request_pilot(request)
        result = pilot_terminate(
            pilot_id=pilot.pk,
            source=pilot_source(pilot.pk),
            reason=serializer.validated_data["reason"] or "the pilot exits",
        )
        body = {
            "pilot_id": pilot.pk,
            "state": result.to_state,
            "attempts_failed": result.attempts_failed,
        }
        return Response(PilotTerminatedSerializer(body).data)


class PilotEventsView(PilotProtocolView):
    def register_outputs(self, request: Request, pilot_id: int) -> PreparedEvents:
        """The events checked and their files registered in the DSM, before the transaction."""
        serializer = PilotEventsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return job_events_prepare(
            events=serializer.validated_data["events"], pilot_id=request_pilot(request).pk
        )

    @extend_schema(
        tags=TAGS,
        summary="Status events of a pilot's attempts, in bulk",
        description="The bulk form of `POST /jobs/{uuid}/report/`: up to 1,000 events, each "
        "naming its job. Each event is answered on its own, in order (`outcome` and "
        "`job_state`, or `error` and `detail`): one bad event does not spoil the others.",
        request=PilotEventsSerializer,
        responses={200: PilotEventsReplySerializer, **error_responses(400, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope, prepare=register_outputs)
    def post(self, request: Request, pilot_id: int, prepared: PreparedEvents) -> Response:
        results = job_events_commit(prepared)
        return Response({"results": [r.as_dict() for r in results]})


class PilotStartsView(PilotProtocolView):
    @extend_schema(
        tags=TAGS,
        summary="A pilot starts several jobs",
        description="The batched form of `POST /jobs/{uuid}/start/`: up to 1,000 job messages' "
        "attempts claimed at once (`queued → running` with this pilot), in one transaction of "
        "a fixed number of statements. Each start is answered on its own, in order: "
        "`outcome: started` with the job message to run, or `error` and `detail` "
        "(`validation_failed`, `not_found`, `job_not_queued`, `stale_attempt`, "
        "`wrong_device`, `task_paused`: drop that message); one bad entry spoils no other. "
        "A pilot that is not live is refused as a whole (409 `pilot_not_live`: put the "
        "messages back). The same call sent again answers the same job messages.",
        request=PilotStartsSerializer,
        responses={200: PilotStartsReplySerializer, **error_responses(400, 409, 422)},
        parameters=[IDEMPOTENCY_KEY],
    )
    @idempotent(pilot_scope)
    def post(self, request: Request, pilot_id: int) -> Response:
        serializer = PilotStartsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        results = pilot_starts_answer(
            pilot=request_pilot(request), entries=serializer.validated_data["starts"]
        )
        return Response({"results": results})
