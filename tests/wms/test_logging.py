"""wms.logging: the seed's console line, JSON lines, and the choice between them."""

from __future__ import annotations

import inspect
import io
import json
import logging
import logging.config
import os
import re
from datetime import UTC, datetime

import pytest
import structlog

from wms.logging import configure_logging, get_logger

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# | jobs.services: 2024-01-25 08:51:33,645 | INFO | services.py:41 | 10 >>> job_started job_id=7
SEED_LINE = re.compile(
    r"^\| (?P<logger>[\w.]+): "
    r"(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) \| "
    r"(?P<level>[A-Z]+) \| "
    r"(?P<file>[\w.]+\.py):(?P<line>\d+) \| "
    r"(?P<pid>\d+) >>> "
    r"(?P<rest>.*)$"
)

LOGGERS = ["django.db.backends", "django_structlog", "celery", "kombu", "amqp"]


@pytest.fixture
def capture():
    """Configure logging from ``configure_logging``'s dict into a StringIO; restore after."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved_levels = {name: logging.getLogger(name).level for name in LOGGERS}
    saved_structlog = structlog.get_config()

    def _configure(fmt: str, level: str = "INFO") -> io.StringIO:
        buf = io.StringIO()
        config = configure_logging(fmt=fmt, level=level)
        config["handlers"]["console"]["stream"] = buf
        logging.config.dictConfig(config)
        return buf

    yield _configure

    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved_structlog)
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def _lines(buf: io.StringIO) -> list[str]:
    return [ANSI.sub("", line) for line in buf.getvalue().splitlines()]


def _here() -> int:
    """The line number of the caller (to compare with the logged file:line)."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None  # CPython has frames
    return frame.f_back.f_lineno


def test_console_line_has_the_seed_shape(capture):
    buf = capture("console")
    log = get_logger("jobs.services")

    line_no = _here() + 1
    log.info("job_started", job_id=7, pilot_id=3)

    (line,) = _lines(buf)
    m = SEED_LINE.match(line)
    assert m, line
    assert m["logger"] == "jobs.services"
    assert m["level"] == "INFO"
    assert m["file"] == "test_logging.py"
    assert int(m["line"]) == line_no
    assert int(m["pid"]) == os.getpid()
    assert m["rest"] == "job_started job_id=7 pilot_id=3"
    stamp = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60  # UTC, now


def test_console_shows_bound_context_and_quotes_values_with_spaces(capture):
    buf = capture("console")
    structlog.contextvars.bind_contextvars(request_id="req-1")
    log = get_logger("tasks.services").bind(task_id=5)

    log.warning("task_paused", reason="by the user")

    (line,) = _lines(buf)
    m = SEED_LINE.match(line)
    assert m, line
    assert m["level"] == "WARNING"
    assert m["rest"] == "task_paused reason='by the user' request_id=req-1 task_id=5"


def test_console_formats_plain_stdlib_records_the_same_way(capture):
    buf = capture("console")

    line_no = _here() + 1
    logging.getLogger("celery.worker").error("worker %s lost", "w1")

    (line,) = _lines(buf)
    m = SEED_LINE.match(line)
    assert m, line
    assert (m["logger"], m["level"], m["rest"]) == ("celery.worker", "ERROR", "worker w1 lost")
    assert (m["file"], int(m["line"])) == ("test_logging.py", line_no)


def test_console_prints_the_traceback_after_the_line(capture):
    buf = capture("console")
    try:
        raise RuntimeError("payload crashed")
    except RuntimeError:
        get_logger("jobs.executor").exception("dispatch_failed", batch=2)

    lines = _lines(buf)
    m = SEED_LINE.match(lines[0])
    assert m and m["level"] == "ERROR" and m["rest"] == "dispatch_failed batch=2"
    assert lines[1].startswith("Traceback")
    assert lines[-1] == "RuntimeError: payload crashed"


def test_json_lines_parse_with_event_level_logger_timestamp_and_context(capture):
    buf = capture("json")
    structlog.contextvars.bind_contextvars(request_id="req-9")
    log = get_logger("pilots.api").bind(pilot_id=4)

    line_no = _here() + 1
    log.info("heartbeat", jobs=2)
    logging.getLogger("django.request").warning("slow request")

    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["event"] == "heartbeat"
    assert first["level"] == "info"
    assert first["logger"] == "pilots.api"
    assert (first["pilot_id"], first["jobs"], first["request_id"]) == (4, 2, "req-9")
    assert (first["filename"], first["lineno"]) == ("test_logging.py", line_no)
    assert first["process"] == os.getpid()
    # ISO 8601 with its zone (UTC), what log collectors parse
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert (second["event"], second["level"], second["logger"]) == (
        "slow request",
        "warning",
        "django.request",
    )
    assert not ANSI.search(buf.getvalue())


def test_json_carries_the_exception(capture):
    buf = capture("json")
    try:
        raise ValueError("bad report")
    except ValueError:
        get_logger("jobs.api").exception("report_failed")
    (record,) = (json.loads(line) for line in buf.getvalue().splitlines())
    assert record["event"] == "report_failed" and record["level"] == "error"
    assert "ValueError: bad report" in record["exception"]


def test_level_filters(capture):
    buf = capture("console", level="WARNING")
    log = get_logger("wms.test")
    log.info("hidden")
    log.warning("shown")
    assert [SEED_LINE.match(line)["rest"] for line in _lines(buf)] == ["shown"]


def test_chatty_libraries_are_quieted():
    config = configure_logging(fmt="console", level="DEBUG")
    assert config["root"]["level"] == "DEBUG"
    assert config["loggers"]["django.db.backends"]["level"] == "WARNING"
    assert config["loggers"]["kombu"]["level"] == "WARNING"


@pytest.mark.parametrize("fmt", ["", "text", "JSON", "yaml"])
def test_invalid_format_is_refused(fmt):
    with pytest.raises(ValueError, match="WMS_LOG_FORMAT"):
        configure_logging(fmt=fmt)
