"""Logging for every process of the WMS: structlog on top of the standard library.

``WMS_LOG_FORMAT=console`` (the default) prints colored lines in the seed's shape::

    | jobs.start: 2024-01-25 08:51:33,645 | INFO | start.py:41 | 10 >>> job_started job_id=7

(logger name, time, level, file:line, process id, then the event and its key=value context);
``WMS_LOG_FORMAT=json`` prints one JSON object per line for log collectors.
"""

from __future__ import annotations

from typing import Any

import structlog

_LEVEL_COLORS = {
    "debug": "\x1b[36m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[31m",
    "critical": "\x1b[1;31m",
}
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_KEY = "\x1b[36m"

# Keys that the renderer shows in the fixed part of the line, not as key=value.
_FIXED = {
    "event",
    "level",
    "logger",
    "timestamp",
    "filename",
    "lineno",
    "process",
    "_record",
    "_from_structlog",
    "func_name",
    "exc_info",
    "exception",
    "stack",
}


class SeedConsoleRenderer:
    """Renders an event dict as the seed's line; colors when ``colors`` is true."""

    def __init__(self, colors: bool = True) -> None:
        self.colors = colors

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colors else text

    def __call__(self, _logger: Any, _name: str, ed: dict[str, Any]) -> str:
        level = str(ed.get("level", "info")).lower()
        head = (
            f"| {ed.get('logger', 'root')}: {ed.get('timestamp', '')} | "
            f"{self._c(_LEVEL_COLORS.get(level, ''), level.upper())} | "
            f"{ed.get('filename', '?')}:{ed.get('lineno', '?')} | {ed.get('process', '')} >>> "
        )
        ctx = " ".join(
            f"{self._c(_KEY, k)}={v!r}"
            if isinstance(v, str) and " " in v
            else f"{self._c(_KEY, k)}={v}"
            for k, v in sorted(ed.items())
            if k not in _FIXED
        )
        line = head + str(ed.get("event", "")) + (" " + ctx if ctx else "")
        exc = ed.get("exception")
        if exc:
            line += "\n" + str(exc)
        return line


def _timestamp(_logger: Any, _name: str, ed: dict[str, Any]) -> dict[str, Any]:
    # The seed's "2024-01-25 08:51:33,645": milliseconds after a comma, UTC.
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    ed["timestamp"] = now.strftime("%Y-%m-%d %H:%M:%S,") + f"{now.microsecond // 1000:03d}"
    return ed


def _shared_processors(fmt: str = "console") -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        # console: the seed's time; json: ISO 8601 with its zone, what log collectors parse
        _timestamp if fmt == "console" else structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.CallsiteParameterAdder(
            {
                structlog.processors.CallsiteParameter.FILENAME,
                structlog.processors.CallsiteParameter.LINENO,
                structlog.processors.CallsiteParameter.PROCESS,
            }
        ),
    ]


def configure_logging(*, fmt: str = "console", level: str = "INFO") -> dict[str, Any]:
    """Configure structlog and return the ``LOGGING`` dict for Django's settings."""
    if fmt not in {"console", "json"}:
        raise ValueError(f"WMS_LOG_FORMAT must be 'console' or 'json', not {fmt!r}")
    shared = _shared_processors(fmt)
    structlog.configure(
        processors=[
            # First: an event below its logger's level is dropped before any work is done on
            # it (the call-site lookup is the dearest processor).
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    if fmt == "json":
        final: list[Any] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        import sys

        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            SeedConsoleRenderer(colors=sys.stderr.isatty()),
        ]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "wms": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": final,
                "foreign_pre_chain": shared,
            },
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "wms"},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            "django_structlog": {"level": level},
            "celery": {"level": level},
            "kombu": {"level": "WARNING"},
            "amqp": {"level": "WARNING"},
        },
    }


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


__all__ = ["configure_logging", "get_logger"]
