"""The plain Celery baseline of ``e2e.py``: a tiny Celery app, no Django, no result backend.

One task, ``noop``, runs the same no-op payload as the WMS's jobs (``wms-payload-noop``, a
subprocess) and then appends one fixed-width line (its completion time) to a counter file
opened with ``O_APPEND``: each line is one ``write`` of 18 bytes, atomic on a local file
system, so the file's size counts the tasks done and its lines say when the last one ended.

Started by ``e2e.py`` as ``celery -A celery_noop worker`` (from this folder) with
``CELERY_BROKER_URL``, ``BENCH_QUEUE`` (the run's own queue, deleted afterwards) and
``BENCH_COUNTER`` (the counter file) in its environment.
"""

from __future__ import annotations

import os
import subprocess
import time

from celery import Celery

LINE = 18  # "%17.6f\n": seconds since the epoch, fixed width

app = Celery("wmsbench_noop", broker=os.environ.get("CELERY_BROKER_URL", "amqp://"))
queue = os.environ.get("BENCH_QUEUE", "wmsbench.noop")
app.conf.update(
    task_default_queue=queue,
    task_default_exchange=queue,
    task_default_routing_key=queue,
    task_ignore_result=True,
    result_backend=None,
    worker_enable_remote_control=False,  # no pidbox queue to leave behind
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)


def record(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():17.6f}\n".encode())
    finally:
        os.close(fd)


def done(path: str) -> tuple[int, float]:
    """(tasks done, completion time of the last one) from the counter file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return 0, 0.0
    n = len(data) // LINE
    last = max((float(data[i * LINE : (i + 1) * LINE]) for i in range(n)), default=0.0)
    return n, last


@app.task(name="noop")
def noop() -> None:
    subprocess.run([os.environ.get("BENCH_PAYLOAD", "wms-payload-noop")], check=True)
    record(os.environ["BENCH_COUNTER"])
