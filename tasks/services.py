"""Kept only for ``wms.demo`` (moving elsewhere in another change): the writes to tasks live
in ``tasks.create``, ``tasks.inputs``, ``tasks.lifecycle`` and ``tasks.finalizer``. Import
from those; this module goes once ``wms.demo`` imports ``tasks.create``."""

from tasks.create import task_create

__all__ = ["task_create"]
