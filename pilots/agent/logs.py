"""Plain stdlib logging in the seed's line shape, to stderr.

    | pilot: 2024-01-25 08:51:33,645 | INFO | agent.py:41 | 4711 >>> job_started attempt=0

Events are snake_case words followed by ``key=value`` context, built by :func:`kv`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

LOGGER_NAME = "pilot"
FORMAT = (
    "| %(name)s: %(asctime)s | %(levelname)s | %(filename)s:%(lineno)d | %(process)d >>> "
    "%(message)s"
)

log = logging.getLogger(LOGGER_NAME)


_QUOTE = re.compile(r'[\s"]')


def _fmt(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text == "" or _QUOTE.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def kv(event: str, **context: Any) -> str:
    """``job_started job_uuid=abc attempt=1``: an event name and its context."""
    if not context:
        return event
    return event + " " + " ".join(f"{k}={_fmt(v)}" for k, v in context.items())


def setup(level: str | int = "INFO", stream: Any = None) -> None:
    """Send the ``pilot`` logger's lines to stderr (UTC times, milliseconds), once."""
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level if isinstance(level, int) else level.upper())
    logger.propagate = False
