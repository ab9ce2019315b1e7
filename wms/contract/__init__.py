"""The wire contract between the WMS and its pilots: every message either side sends or
receives is built and checked here, defined once. Django-free on purpose: the pilot agent
(``pilots/agent/``) imports this package, and so does the server.

- ``wms.contract.messages``: the bus messages (job message, status event, command; each a JSON
  object with ``v``, the contract version, and ``kind``), the signature of status events;
- ``wms.contract.rest``: the bodies of the pilot's REST calls and the answers it reads.

``decode_*`` functions and ``from_dict`` validate what arrives and raise ``ContractError`` with
a clear reason.
"""

from wms.contract.messages import (
    COMMAND,
    COMMANDS,
    DEVICE_TYPES,
    EVENT,
    EVENT_PILOT_HEADER,
    EVENT_SIGNATURE_HEADER,
    FINAL_STATES,
    JOB,
    VERSION,
    Command,
    ContractError,
    InputFile,
    JobMessage,
    StatusEvent,
    decode_command,
    decode_job,
    event_headers,
    event_signature_valid,
    event_signed_by_any,
    sign_event_body,
)
from wms.contract.rest import (
    EVENT_OUTCOMES,
    MAX_EVENTS,
    PILOT_STATES,
    REPORT_STATES,
    EventResult,
    EventsBody,
    HeartbeatBody,
    HeartbeatJob,
    HeartbeatReply,
    OrphanReport,
    Registration,
    RegistrationAnswer,
    ReportBody,
    StartBody,
    TerminateBody,
    decode_events_answer,
    decode_start_answer,
)

__all__ = [
    "COMMAND",
    "COMMANDS",
    "DEVICE_TYPES",
    "EVENT",
    "EVENT_OUTCOMES",
    "EVENT_PILOT_HEADER",
    "EVENT_SIGNATURE_HEADER",
    "FINAL_STATES",
    "JOB",
    "MAX_EVENTS",
    "PILOT_STATES",
    "REPORT_STATES",
    "VERSION",
    "Command",
    "ContractError",
    "EventResult",
    "EventsBody",
    "HeartbeatBody",
    "HeartbeatJob",
    "HeartbeatReply",
    "InputFile",
    "JobMessage",
    "OrphanReport",
    "Registration",
    "RegistrationAnswer",
    "ReportBody",
    "StartBody",
    "StatusEvent",
    "TerminateBody",
    "decode_command",
    "decode_events_answer",
    "decode_job",
    "decode_start_answer",
    "event_headers",
    "event_signature_valid",
    "event_signed_by_any",
    "sign_event_body",
]
