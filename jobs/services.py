"""Kept only for ``jobs.consumer`` (moving elsewhere in another change): the writes to jobs
live in ``jobs.control``, ``jobs.start``, ``jobs.reports`` and ``jobs.outputs``. Import
from those; this module goes once ``jobs.consumer`` imports ``jobs.reports``."""

from jobs.reports import job_events_apply

__all__ = ["job_events_apply"]
