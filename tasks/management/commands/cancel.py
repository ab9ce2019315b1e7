"""``manage.py cancel``: cancel a task (and its jobs) or some jobs, through the services.

    manage.py cancel --task 12 --reason "wrong input"
    manage.py cancel --job 40 --job 41

Prints what changed; exits non-zero on an error (unknown id, a finished task or job: 409).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from jobs.control import job_cancel
from jobs.models import OPEN_JOB_STATES, Job
from tasks.lifecycle import task_cancel
from wms.choices import TransitionSource
from wms.exceptions import WMSError


class Command(BaseCommand):
    help = "Cancel a task (and every job of it not final yet) or one or more jobs."

    def add_arguments(self, parser: Any) -> None:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--task", type=int, help="The id of the task to cancel.")
        target.add_argument(
            "--job", type=int, action="append", help="The id of a job to cancel (repeatable)."
        )
        parser.add_argument("--reason", default="", help="Recorded in the transition log.")

    def handle(self, *args: Any, **options: Any) -> None:
        reason = options["reason"] or "cancelled by manage.py cancel"
        source = TransitionSource.COMMAND
        failed = 0
        if options["task"] is not None:
            task_id = options["task"]
            open_before = Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES).count()
            try:
                result = task_cancel(task_id=task_id, source=source, reason=reason)
            except WMSError as exc:
                raise CommandError(f"task {task_id}: {exc.detail}") from exc
            if result.won:
                self.stdout.write(
                    f"task {task_id}: {result.from_state} -> cancelled; "
                    f"{open_before} job(s) cancelled"
                )
            else:
                self.stdout.write(f"task {task_id}: already cancelled; nothing changed")
            return
        for job_id in options["job"]:
            try:
                result = job_cancel(job_id=job_id, source=source, reason=reason)
            except WMSError as exc:
                self.stderr.write(f"job {job_id}: {exc.detail}")
                failed += 1
                continue
            if result.won:
                self.stdout.write(f"job {job_id}: {result.from_state} -> cancelled")
            else:
                self.stdout.write(f"job {job_id}: already cancelled; nothing changed")
        if failed:
            raise CommandError(f"{failed} job(s) could not be cancelled")
