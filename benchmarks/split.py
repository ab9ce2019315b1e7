"""Split N input files into jobs, against a raw COPY of the same rows in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms .venv/bin/python benchmarks/split.py [N]

Target (issue 3): >= 100k jobs/s and <= 3x the raw COPY.
"""

from __future__ import annotations

import io
import sys
import uuid

from _common import Timer, bench_database, django_setup, report


def main(n: int) -> None:
    django_setup()
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from files.models import File
    from files.services import dataset_add_files, dataset_close, dataset_register
    from jobs.models import Job
    from tasks.services import task_create
    from tasks.splitter import task_split

    with bench_database():
        user = get_user_model().objects.create_user("bench")
        ds = dataset_register(name="bench.input")
        with Timer() as t_reg:
            dataset_add_files(
                dataset=ds, files=[{"name": f"evt.{i:07d}.root", "size": 1000} for i in range(n)]
            )
        dataset_close(dataset=ds, source="bench")
        task = task_create(owner=user, executable="noop", data_in_uid=ds.uid)
        with Timer() as t_split:
            result = task_split(task_id=task.pk)
        assert result.jobs == n, result
        assert Job.objects.filter(task=task).count() == n
        assert File.objects.filter(task=task).count() == n

        # The same rows (n jobs + n input files) by raw COPY, in one transaction.
        task2 = task_create(owner=user, executable="noop", data_in_uid=ds.uid)
        entries = list(ds.entries.order_by("id").values_list("id", "name", "size"))
        now = timezone.now().isoformat()
        with Timer() as t_copy, transaction.atomic(), connection.cursor() as cur:
            cur.execute("SELECT nextval('jobs_job_id_seq') FROM generate_series(1, %s)", [n])
            ids = [r[0] for r in cur.fetchall()]
            buf = io.StringIO()
            for jid in ids:
                buf.write(
                    f"{jid}\t{uuid.uuid4()}\t{task2.pk}\tnoop\t\t0\tdefined\t3\t0\tcpu\tmap\t"
                    f"{now}\t{now}\t{now}\n"
                )
            pg = cur.cursor
            with pg.copy(
                "COPY jobs_job (id, uuid, task_id, executable, args, rank, state, retries,"
                " cur_retry, device_type, mode, created_at, updated_at, state_changed_at)"
                " FROM STDIN"
            ) as cp:
                cp.write(buf.getvalue())
            buf = io.StringIO()
            for jid, (eid, name, size) in zip(ids, entries, strict=True):
                buf.write(
                    f"{name}\tinput\t{size}\tready\t\t\t{jid}\t{task2.pk}\t{ds.pk}\t{eid}\t"
                    f"{now}\t{now}\n"
                )
            with pg.copy(
                "COPY files_file (file_name, type, size, status, check_sum, url, job_id,"
                " task_id, dataset_id, entry_id, created_at, updated_at) FROM STDIN"
            ) as cp:
                cp.write(buf.getvalue())
        assert Job.objects.filter(task=task2).count() == n

    rate = n / t_split.seconds
    report(
        f"split {n} input files into {n} jobs (files_per_job=1)",
        [
            ("register files (DSM)", f"{t_reg.seconds:.2f} s"),
            ("splitter", f"{t_split.seconds:.2f} s  = {rate:,.0f} jobs/s  (target >= 100,000)"),
            ("raw COPY same rows", f"{t_copy.seconds:.2f} s  = {n / t_copy.seconds:,.0f} rows/s"),
            ("ratio split / COPY", f"{t_split.seconds / t_copy.seconds:.2f}x  (target <= 3x)"),
        ],
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
