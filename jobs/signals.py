"""What the jobs app tells the apps above it (dependencies one way, docs/architecture.md).

``jobs`` imports no app above it (``tasks``, ``pilots``). An effect that must reach one of them
and commit with the change that caused it is a signal sent inside the transaction; the app
above connects its receiver in its ``AppConfig.ready`` and writes its own rows there (so the
change and its effect commit together, or neither does). Effects that may come later travel as
on-commit kicks by name (``wms.kicks``) or as rows the other app polls.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.dispatch import Signal


@dataclass(frozen=True)
class KillOrder:
    """A running attempt the server ended (cancel, kill): its pilot must kill the payload."""

    pilot_id: int
    job_id: int
    job_uuid: str
    attempt: int
    reason: str


# Sent with ``orders=[KillOrder, ...]`` inside the transaction that ended the attempts; the
# pilots app turns them into ``kill_job`` commands (pilots.apps).
attempts_to_kill = Signal()
