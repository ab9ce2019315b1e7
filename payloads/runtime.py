"""What a payload receives from the pilot that runs it: environment variables.

=====================  ============================================================================
``WMS_INPUT_FILES``    JSON list of the job's input files: local paths (or ``file://`` URLs)
``WMS_OUTPUT_DIR``     the directory where the job writes its outputs (default: the working dir)
``WMS_ATTEMPT``        the attempt number of the job now running (default 0)
=====================  ============================================================================

Django-free, like every payload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

INPUT_FILES = "WMS_INPUT_FILES"
OUTPUT_DIR = "WMS_OUTPUT_DIR"
ATTEMPT = "WMS_ATTEMPT"


class RuntimeConfigError(ValueError):
    """The environment does not follow the convention above."""


def local_path(item: str) -> Path:
    """A local path from a path or a ``file://`` URL; other schemes are not readable here."""
    if "://" not in item:
        return Path(item)
    parsed = urlparse(item)
    if parsed.scheme != "file":
        raise RuntimeConfigError(f"cannot read {item!r}: only local paths and file:// URLs")
    return Path(unquote(parsed.path))


def input_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The job's input files, in the order the pilot gives them."""
    env = os.environ if environ is None else environ
    raw = env.get(INPUT_FILES, "")
    if not raw.strip():
        return []
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise RuntimeConfigError(f"{INPUT_FILES} is not JSON: {exc}") from exc
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise RuntimeConfigError(f"{INPUT_FILES} must be a JSON list of strings")
    return [local_path(i) for i in items]


def output_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the job writes its outputs (created if missing)."""
    env = os.environ if environ is None else environ
    path = Path(env.get(OUTPUT_DIR) or ".")
    path.mkdir(parents=True, exist_ok=True)
    return path


def attempt(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(ATTEMPT, "") or "0"
    try:
        return int(raw)
    except ValueError as exc:
        raise RuntimeConfigError(f"{ATTEMPT} must be an integer, not {raw!r}") from exc
