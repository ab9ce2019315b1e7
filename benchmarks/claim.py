"""Dispatch claim cost with 10^6 finished jobs in the table, against 10^3, in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms .venv/bin/python benchmarks/claim.py [BIG]

The claim of a batch (``SELECT ... FOR UPDATE SKIP LOCKED`` of defined jobs, highest rank first,
the UPDATE to queued, the transition rows, the message data) is timed on the same 1,000
defined jobs, rolled back after each run, first beside 10^3 finished jobs, then beside 10^6.
Target (issue 3): ratio <= 1.2 (the partial index keeps history out of the claim).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

from _common import bench_database, django_setup, report


def main(big: int) -> None:
    django_setup()
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from files.services import dataset_register
    from jobs.executor import _claim
    from jobs.models import Job, JobState
    from tasks.create import task_create
    from tasks.lifecycle import task_transition
    from tasks.models import TaskState
    from wms import db

    def add_jobs(task_id: int, n: int, state: str, rank: int = 0) -> None:
        now = timezone.now()
        with transaction.atomic():
            ids = db.allocate_ids(Job, n)
            db.copy_rows(
                Job,
                (
                    "id",
                    "uuid",
                    "task_id",
                    "executable",
                    "args",
                    "rank",
                    "state",
                    "retries",
                    "cur_retry",
                    "device_type",
                    "mode",
                    "created_at",
                    "updated_at",
                    "state_changed_at",
                ),
                (
                    (
                        i,
                        uuid.uuid4(),
                        task_id,
                        "noop",
                        "",
                        rank,
                        state,
                        3,
                        0,
                        "cpu",
                        "map",
                        now,
                        now,
                        now,
                    )
                    for i in ids
                ),
            )

    def time_claim(runs: int = 15) -> float:
        with connection.cursor() as cur:
            cur.execute("ANALYZE jobs_job")
        samples = []
        for _ in range(runs):
            with transaction.atomic():
                t0 = time.perf_counter()
                ids, _msgs = _claim("cpu", 1000)
                samples.append(time.perf_counter() - t0)
                assert len(ids) == 1000
                transaction.set_rollback(True)
        return statistics.median(samples)

    with bench_database():
        user = get_user_model().objects.create_user("bench")
        ds = dataset_register(name="bench.input")
        task = task_create(owner=user, executable="noop", data_in_uid=ds.uid)
        task_transition(task_id=task.pk, target=TaskState.RUNNING, source="system")
        old = task_create(owner=user, executable="noop", data_in_uid=ds.uid)
        add_jobs(task.pk, 1000, JobState.DEFINED)
        add_jobs(old.pk, 1000, JobState.FINISHED)
        small = time_claim()
        t0 = time.perf_counter()
        for _ in range((big - 1000) // 100_000):
            add_jobs(old.pk, 100_000, JobState.FINISHED)
        rest = (big - 1000) % 100_000
        if rest:
            add_jobs(old.pk, rest, JobState.FINISHED)
        fill = time.perf_counter() - t0
        with connection.cursor() as cur:
            cur.execute("VACUUM ANALYZE jobs_job")
        total = Job.objects.count()
        large = time_claim()

    report(
        "claim of a 1,000-job batch (median of 15, rolled back each time)",
        [
            ("with 10^3 finished jobs", f"{small * 1000:.1f} ms"),
            (
                f"with {total - 1000:,} finished jobs",
                f"{large * 1000:.1f} ms  (filled in {fill:.0f} s)",
            ),
            ("ratio", f"{large / small:.2f}  (target <= 1.2)"),
        ],
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
