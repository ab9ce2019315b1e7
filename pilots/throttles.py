"""The pilots' throttle scope (``pilot``, see ``wms.throttles``): per pilot, not per address.

Off by default (``WMS_THROTTLE_PILOT`` empty): a pilot's call rate is bounded by the protocol
(heartbeats, batched starts and reports), and a pilot that misbehaves is revoked by staff.
Off, it costs no cache access on the pilot path.
"""

from __future__ import annotations

from typing import Any

from pilots.models import Pilot
from wms.throttles import ScopedRateThrottle


class PilotThrottle(ScopedRateThrottle):
    scope = "pilot"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        pilot = request.auth
        if not isinstance(pilot, Pilot):
            return None
        return self.cache_format % {"scope": self.scope, "ident": pilot.pk}
