"""Choices shared by several apps (the seed's enums)."""

from django.db import models


class DeviceType(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"


class Mode(models.TextChoices):
    MAP = "map", "map"
    MERGE = "merge", "merge"


class TaskState(models.TextChoices):
    """A task's states (the machine is ``tasks.models.TASK_MACHINE``); shared so that the apps
    below ``tasks`` (jobs: the executor dispatches only a running task's jobs, a paused task's
    start is refused) read them without importing ``tasks``."""

    DEFINED = "defined", "defined"
    RUNNING = "running", "running"
    PAUSED = "paused", "paused"
    FINISHED = "finished", "finished"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


class TransitionSource(models.TextChoices):
    """Who asked for a state change; a pilot source is written as ``pilot:<id>``."""

    API = "api", "API"
    ADMIN = "admin", "admin"
    SPLITTER = "splitter", "splitter"
    EXECUTOR = "executor", "executor"
    REAPER = "reaper", "reaper"
    SYSTEM = "system", "system"
    COMMAND = "command", "management command"


class PilotState(models.TextChoices):
    """A pilot's states (``pilots.Pilot.state``), here so that the apps below pilots can name
    them (a killed attempt may run until its pilot is gone) without importing pilots."""

    REGISTERED = "registered", "registered"
    IDLE = "idle", "idle"
    BUSY = "busy", "busy"
    DRAINING = "draining", "draining"
    TERMINATED = "terminated", "terminated"
    LOST = "lost", "lost"


# A pilot in one of these states runs nothing any more (its payloads are dead or judged so).
GONE_PILOT_STATES = (PilotState.TERMINATED, PilotState.LOST)
