"""Split N input files into jobs, against a raw COPY of the same rows in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/wms .venv/bin/python benchmarks/split.py [N] \
        [--datasets K]

Target (issue 3): >= 100k jobs/s and <= 3x the raw COPY. Then (issue 5) the same N files spread
over a series of K input datasets (default 100), one task over the series: what the per-input
work (a DSM read of each dataset, one transaction per page) costs against the single dataset.
"""

from __future__ import annotations

import argparse
import io
import uuid

from _common import Timer, bench_database, django_setup, report


def main(n: int, k: int) -> None:
    django_setup()
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.utils import timezone

    from files.models import File
    from files.services import dataset_add_files, dataset_close, dataset_register
    from jobs.models import Job
    from tasks.create import task_create
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

        # The same number of files over a series of k datasets, one task over the series.
        series = [dataset_register(name=f"bench.series.{i:04d}") for i in range(k)]
        per = n // k
        for i, sds in enumerate(series):
            dataset_add_files(
                dataset=sds,
                files=[{"name": f"evt.{i:04d}.{j:07d}.root", "size": 1000} for j in range(per)],
            )
            dataset_close(dataset=sds, source="bench")
        task3 = task_create(owner=user, executable="noop", data_in_uids=[d.uid for d in series])
        with Timer() as t_series:
            result3 = task_split(task_id=task3.pk)
        assert result3.jobs == per * k, result3
        assert not task3.inputs.filter(split_done_at__isnull=True).exists()

    rate = n / t_split.seconds
    series_rate = per * k / t_series.seconds
    report(
        f"split {n} input files into {n} jobs (files_per_job=1)",
        [
            ("register files (DSM)", f"{t_reg.seconds:.2f} s"),
            ("splitter", f"{t_split.seconds:.2f} s  = {rate:,.0f} jobs/s  (target >= 100,000)"),
            ("raw COPY same rows", f"{t_copy.seconds:.2f} s  = {n / t_copy.seconds:,.0f} rows/s"),
            ("ratio split / COPY", f"{t_split.seconds / t_copy.seconds:.2f}x  (target <= 3x)"),
            (
                f"series of {k} datasets",
                f"{t_series.seconds:.2f} s  = {series_rate:,.0f} jobs/s  "
                f"({series_rate / rate:.2f}x the single dataset)",
            ),
        ],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="input files")
    parser.add_argument("--datasets", type=int, default=100, help="datasets of the series")
    args = parser.parse_args()
    main(args.n, max(1, args.datasets))
