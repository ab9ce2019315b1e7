"""``manage.py demo``: run the demo tasks through the WMS and check what they produced.

Needs a running WMS (web app, worker with beat, a CPU and a GPU pilot): ``manage.py up`` starts
everything and runs this command. Exits 0 only when every job of the demo finished and every
output checked out (docs/demo.md).
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from devtools import demo
from devtools.services import demo_operator_ensure


class Command(BaseCommand):
    help = (
        "Register a demo input dataset, create a CPU and a GPU map task over it, follow their "
        "jobs to the end and check the outputs. Exit status 0 only if every job finished."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--files", type=int, default=demo.DEFAULT_FILES, help="input seed files (24)"
        )
        parser.add_argument(
            "--events", type=int, default=demo.DEFAULT_EVENTS, help="events per input file"
        )
        parser.add_argument(
            "--gpu-files-per-job",
            type=int,
            default=demo.DEFAULT_GPU_FILES_PER_JOB,
            help="input files per job of the GPU task (4)",
        )
        parser.add_argument("--no-gpu", action="store_true", help="no GPU task")
        parser.add_argument("--cpu-args", default="", help="extra wms-payload-map args (CPU)")
        parser.add_argument(
            "--gpu-args", default="--process higgs", help="wms-payload-map args of the GPU task"
        )
        parser.add_argument("--retries", type=int, default=3, help="retries per job")
        parser.add_argument(
            "--timeout", type=float, default=600.0, help="seconds to wait for the jobs (600)"
        )
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")

    def handle(self, *args, **o):
        if o["files"] < 1 or o["events"] < 0 or o["gpu_files_per_job"] < 1:
            raise CommandError("--files and --gpu-files-per-job must be >= 1, --events >= 0")
        owner = demo_operator_ensure()
        run = demo.demo_start(
            owner=owner,
            files=o["files"],
            events=o["events"],
            gpu_files_per_job=o["gpu_files_per_job"],
            cpu_args=o["cpu_args"],
            gpu_args=o["gpu_args"],
            gpu=not o["no_gpu"],
            max_retries=o["retries"],
        )
        self.stdout.write(
            f"demo {run.name}: {o['files']} input files in dataset {run.dataset_uid} "
            f"({run.directory / 'inputs'})"
        )
        for t in run.tasks:
            self.stdout.write(
                f"  {t.label} task {t.task_id}: {t.expected_jobs} jobs on {t.device_type} "
                f"-> {t.output_url}   {settings.WMS_SERVER_URL}/admin/tasks/task/{t.task_id}/"
            )

        progress = self._follow(run, timeout=o["timeout"], interval=o["interval"])
        timed_out = not demo.demo_done(progress)
        if timed_out:
            self.stdout.write(self.style.WARNING(f"timed out after {o['timeout']:g} s"))
        summaries = demo.demo_summary(run)
        self._report(summaries)
        if timed_out or not all(s.ok for s in summaries):
            raise CommandError("demo FAILED: not every job finished with checked outputs")
        self.stdout.write(self.style.SUCCESS("demo OK: every job finished, every output checked"))

    def _follow(self, run: demo.DemoRun, *, timeout: float, interval: float):
        deadline = time.monotonic() + timeout
        last, last_print = "", 0.0
        while True:
            progress = demo.demo_progress(run)
            text = " || ".join(p.line() for p in progress)
            now = time.monotonic()
            if text != last or now - last_print >= 15:
                self.stdout.write(f"[{time.strftime('%H:%M:%S')}] {text}")
                last, last_print = text, now
            if demo.demo_done(progress) or now >= deadline:
                return progress
            time.sleep(interval)

    def _report(self, summaries: list[demo.TaskSummary]) -> None:
        self.stdout.write("summary:")
        for s in summaries:
            p, c = s.progress, s.progress.counts
            self.stdout.write(
                f"  {p.task.label} task {p.task.task_id} [{p.state}]: {c['finished']} finished, "
                f"{c['failed']} failed, {c['cancelled']} cancelled, {p.jobs - p.final} not final "
                f"(of {p.task.expected_jobs})"
            )
            if s.attempts:
                shown = ", ".join(f"{n} {state}" for state, n in sorted(s.attempts.items()))
                self.stdout.write(f"    attempts: {sum(s.attempts.values())} ({shown})")
            if s.output_dataset_uid:
                size = sum(f.size for f in s.registered)
                self.stdout.write(
                    f"    output dataset {s.output_dataset_uid}: {len(s.registered)} files, "
                    f"{size} bytes"
                )
            else:
                self.stdout.write("    output dataset: none recorded on the task")
            verified = sum(o.verified for o in s.outputs)
            self.stdout.write(
                f"    outputs of finished jobs: {len(s.outputs)} ({verified} read back and "
                "matching their registered size and checksum)"
            )
            for out in s.outputs[:3]:
                self.stdout.write(f"      {out.name} {out.size} B {out.check_sum} {out.url}")
            if len(s.outputs) > 3:
                self.stdout.write(f"      ... and {len(s.outputs) - 3} more")
            if s.merged is not None:
                m = s.merged
                self.stdout.write(
                    f"    merged histogram: {m.entries} events from {m.jobs} jobs, "
                    f"{demo.histo.describe(m)} -> {s.merged_path}"
                )
                self.stdout.write(f"    |{demo.sparkline(m)}|")
            for problem in s.problems:
                self.stdout.write(self.style.ERROR(f"    problem: {problem}"))
