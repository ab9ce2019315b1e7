"""What the pilot says about its host: resources at registration, metrics with heartbeats."""

from __future__ import annotations

import glob
import os
import shutil
import socket
from typing import Any

import psutil

MB = 1024 * 1024


def hostname() -> str:
    fqdn = socket.getfqdn()
    if not fqdn or fqdn.startswith("localhost"):
        return socket.gethostname()
    return fqdn


def cores() -> int:
    """The cores this process may use (its CPU affinity, so a cgroup/taskset limit counts)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return psutil.cpu_count(logical=True) or 1


def memory_mb() -> int:
    return int(psutil.virtual_memory().total // MB)


def _count_visible(value: str) -> int:
    return len([d for d in value.split(",") if d.strip() and d.strip() != "-1"])


def gpus() -> int:
    """GPUs visible to this process: ``CUDA_VISIBLE_DEVICES`` (or ROCm's ``HIP_VISIBLE_DEVICES``)
    when set, else the NVIDIA device files ``/dev/nvidia<N>``."""
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return _count_visible(value)
    return len(glob.glob("/dev/nvidia[0-9]*"))


def metrics(work_dir: str | os.PathLike) -> dict[str, Any]:
    """Host metrics of a heartbeat (the contract's keys first, then a few more)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    try:
        free_disk_mb = shutil.disk_usage(work_dir).free // MB
    except OSError:
        free_disk_mb = -1
    vm = psutil.virtual_memory()
    try:
        own_rss = psutil.Process().memory_info().rss
    except psutil.Error:
        own_rss = 0
    return {
        "load1": round(load1, 2),
        "free_disk_mb": int(free_disk_mb),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "rss_mb": int(own_rss // MB),  # the pilot's own memory; the jobs' is per job
        "mem_total_mb": int(vm.total // MB),
        "mem_available_mb": int(vm.available // MB),
        "mem_percent": vm.percent,
    }
