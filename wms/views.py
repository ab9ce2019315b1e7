"""Views shared by the whole project: the health check."""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from wms import bus

_broker_verdict = threading.local()  # (broker URL, checked at, "ok" or the failure)


def database_status() -> str:
    """``ok``, or what failed (the exception's class: no host names or passwords leak)."""
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    except Exception as exc:  # any database failure is "unavailable", not a 500
        return f"unavailable ({type(exc).__name__})"
    return "ok"


def broker_status() -> str:
    """``ok``, or what failed. One connection attempt (per URL of a failover list: ``ok``
    when one node of a cluster answers), no retry; the verdict is kept for
    ``WMS_HEALTHZ_BROKER_TTL`` seconds per process thread, so that frequent probes do not
    open a broker connection each."""
    url = bus.broker_url()
    now = time.monotonic()
    cached = getattr(_broker_verdict, "value", None)
    ttl = settings.WMS_HEALTHZ_BROKER_TTL
    if cached is not None and cached[0] == url and now - cached[1] < ttl:
        return cached[2]
    conn = bus.new_connection(connect_timeout=3)
    try:
        bus.ensure_connected(conn)  # each URL of a failover list once
        verdict = "ok"
    except Exception as exc:  # refused, timed out, bad credentials: all "unavailable"
        verdict = f"unavailable ({type(exc).__name__})"
    finally:
        conn.release()
    _broker_verdict.value = (url, now, verdict)
    return verdict


@require_GET
def healthz(_request: HttpRequest) -> JsonResponse:
    """200 when the database and the broker answer, 503 (with ``Retry-After``) otherwise;
    each is reported on its own. No authentication."""
    checks = {"database": database_status(), "broker": broker_status()}
    if all(v == "ok" for v in checks.values()):
        return JsonResponse({"status": "ok", **checks})
    response = JsonResponse({"status": "error", **checks}, status=503)
    response["Retry-After"] = str(settings.WMS_API_RETRY_AFTER)
    return response
