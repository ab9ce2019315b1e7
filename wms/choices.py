"""Choices shared by several apps (the seed's enums)."""

from django.db import models


class DeviceType(models.TextChoices):
    CPU = "cpu", "CPU"
    GPU = "gpu", "GPU"


class Mode(models.TextChoices):
    MAP = "map", "map"
    MERGE = "merge", "merge"


class TransitionSource(models.TextChoices):
    """Who asked for a state change; a pilot source is written as ``pilot:<id>``."""

    API = "api", "API"
    ADMIN = "admin", "admin"
    SPLITTER = "splitter", "splitter"
    EXECUTOR = "executor", "executor"
    REAPER = "reaper", "reaper"
    SYSTEM = "system", "system"
    COMMAND = "command", "management command"
