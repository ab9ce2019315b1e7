"""Where the deployment lets data live: the storage roots of inputs and the output root.

- ``WMS_STORAGE_ROOTS``: the URL prefixes input files may live under. A file registered in an
  input dataset (API, admin, DSM clients) must lie under one of them.
- ``WMS_OUTPUT_ROOT``: every task's outputs go inside it, in its owner's folder
  ``<root>/<owner>/`` and in a place of its own there (``tasks.create.task_create``); the
  files a pilot reports lie under its job's output URL (``jobs.reports``).

URLs are compared in their canonical form (:mod:`wms.locations`). Refusals are
``ValidationFailed`` keyed by the field that named the URL, so they answer 400 naming it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from django.conf import settings

from wms.exceptions import ValidationFailed
from wms.locations import LocationError, canonical_roots, canonical_url, is_under, under_any

_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9._@+-]*\Z")


@functools.lru_cache(maxsize=8)
def _canonical(roots: tuple[str, ...]) -> tuple[str, ...]:
    return canonical_roots(roots)


def storage_roots() -> tuple[str, ...]:
    """The canonical storage roots of inputs (``WMS_STORAGE_ROOTS``)."""
    return _canonical(tuple(settings.WMS_STORAGE_ROOTS))


def output_root() -> str:
    """The canonical output root (``WMS_OUTPUT_ROOT``)."""
    return _canonical((settings.WMS_OUTPUT_ROOT,))[0]


def _fail(field: str, message: str) -> ValidationFailed:
    return ValidationFailed({field: [message]})


def check_url_under(url: Any, roots: Sequence[str], *, field: str, what: str) -> str:
    """The canonical form of ``url`` if it lies under one of ``roots`` (canonical); else a
    400 naming ``field``. ``what`` says what the roots are, for the message."""
    if not isinstance(url, str):
        raise _fail(field, "Must be a string.")
    try:
        canonical = under_any(url, roots)
    except LocationError as exc:
        raise _fail(field, f"Not a usable URL: {exc}") from exc
    if canonical is None:
        listed = ", ".join(roots) or "none configured"
        raise _fail(field, f"{url} is not under {what} ({listed}).")
    return canonical


def check_input_url(url: Any, *, field: str = "url") -> str:
    """An input file's URL: under a storage root (``WMS_STORAGE_ROOTS``), else 400."""
    return check_url_under(
        url, storage_roots(), field=field, what="an allowed storage root (WMS_STORAGE_ROOTS)"
    )


def owner_segment(owner: Any) -> str:
    """The name of an owner's folder under the output root: the username when it is a plain
    path segment (letters, digits, ``._@+-``, not starting with a dot), else ``~<user id>``
    (``~`` is in no valid username, so the two kinds never meet)."""
    username = owner.get_username()
    if _PLAIN_SEGMENT.match(username):
        return username
    return f"~{owner.pk}"


def owner_place(owner: Any) -> str:
    """The canonical folder of an owner's task outputs: ``<output root>/<owner segment>``."""
    return canonical_url(f"{output_root()}/{owner_segment(owner)}")


def check_output_place(url: Any, *, owner: Any, field: str = "data_out_url") -> str:
    """A task's output location: inside its owner's folder of the output root and below it
    (the folder itself is no task's place); canonical, else 400 naming ``field``."""
    place = owner_place(owner)
    canonical = check_url_under(
        url, (place,), field=field, what="the owner's folder of the output root"
    )
    if canonical == place:
        raise _fail(
            field,
            f"{url} is the owner's whole folder ({place}): name a place of the task's own "
            "inside it, or leave it empty for the default.",
        )
    return canonical


def is_within(url: str, root: str) -> bool:
    """Whether ``url`` (any form) lies under the canonical ``root``; False if unreadable."""
    try:
        return is_under(canonical_url(url), root)
    except LocationError:
        return False
