"""The Data Storage Manager (DSM) interface and the factory that picks a backend.

The WMS talks to the DSM's catalogue (datasets and the files in them) through :class:`DSMClient`
only. Two backends implement it, chosen by ``settings.WMS_DSM_BACKEND``:

- ``local`` (default): the WMS's own ``Dataset`` / ``DatasetEntry`` tables are the catalogue;
  every write goes through ``files.services`` (:mod:`files.dsm.local`).
- ``http``: a client for an external DSM speaking the REST contract of ``docs/dsm.md``
  (:mod:`files.dsm.http`).

Both return the plain dataclasses below, never Django models, so a caller cannot tell them
apart. Errors are ``wms.exceptions``: ``NotFound``, ``ValidationFailed``, ``Conflict`` /
``DatasetClosed``, and ``DSMError`` when the DSM itself failed or answered nonsense.

This module imports no Django at import time (``get_dsm`` reads the settings when called).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from wms.exceptions import DSMError, ValidationFailed

__all__ = [
    "BACKENDS",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "ROLES",
    "STATES",
    "ClientBase",
    "DSMClient",
    "DatasetInfo",
    "DatasetSpec",
    "FileInfo",
    "FilePage",
    "UIDLike",
    "get_dsm",
    "iter_files",
]

ROLES = ("input", "output")
STATES = ("open", "closed")
BACKENDS = ("local", "http")
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000

UIDLike = uuid.UUID | str


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset of the catalogue as the DSM reports it."""

    uid: uuid.UUID
    name: str
    role: str  # "input" | "output"
    state: str  # "open" | "closed"
    file_count: int
    total_size: int
    location: str = ""

    @property
    def is_open(self) -> bool:
        return self.state == "open"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset for :meth:`DSMClient.register_datasets` (a mapping with these keys works too)."""

    name: str
    role: str = "input"
    uid: uuid.UUID | None = None
    location: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role, "location": self.location}
        if self.uid is not None:
            out["uid"] = self.uid
        return out


@dataclass(frozen=True)
class FileInfo:
    """One file of a dataset's catalogue. ``id`` is the entry's id, also the paging cursor."""

    id: int
    name: str
    size: int
    check_sum: str
    url: str


@dataclass(frozen=True)
class FilePage:
    """One page of :meth:`DSMClient.list_files`.

    ``next_cursor`` is the ``after`` for the next page, or ``None`` when this page is the last
    one *for now*: an open dataset may grow, and a caller resumes later with
    ``after=files[-1].id`` of the last page it read.
    """

    files: list[FileInfo] = field(default_factory=list)
    next_cursor: int | None = None


@runtime_checkable
class DSMClient(Protocol):
    """The DSM's catalogue as the WMS uses it; the ``local`` and ``http`` backends implement it."""

    def register_dataset(
        self,
        name: str,
        *,
        role: str = "input",
        uid: UIDLike | None = None,
        location: str = "",
    ) -> DatasetInfo:
        """Create an open dataset. A name or uid already taken → ``Conflict``."""
        ...

    def register_datasets(
        self, specs: Sequence[DatasetSpec | Mapping[str, Any]]
    ) -> list[DatasetInfo]:
        """Create several open datasets at once, all or none; results in the order of ``specs``."""
        ...

    def register_files(
        self, dataset_uid: UIDLike, files: Sequence[Mapping[str, Any]]
    ) -> list[FileInfo]:
        """Add files ``{name, size, check_sum, url}`` to an open dataset, all or none.

        Closed dataset → ``DatasetClosed``; a name already in the dataset → ``Conflict``;
        unknown dataset → ``NotFound``; a bad entry → ``ValidationFailed``.
        """
        ...

    def list_files(
        self, dataset_uid: UIDLike, *, after: int | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> FilePage:
        """The files of a dataset with ``id > after``, in ascending ``id`` (registration) order."""
        ...

    def get_dataset(self, dataset_uid: UIDLike) -> DatasetInfo:
        """The dataset with its state and counters; unknown → ``NotFound``."""
        ...

    def close_dataset(
        self, dataset_uid: UIDLike, *, source: str = "dsm", reason: str = ""
    ) -> DatasetInfo:
        """Close a dataset (open → closed); closing a closed dataset again is a no-op."""
        ...

    def close(self) -> None:
        """Release the client's resources (connections); the client is unusable afterwards."""
        ...


class ClientBase:
    """What both backends share: use as a context manager, ``close()`` when done."""

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_page_args(after: Any, limit: Any) -> None:
    """The paging arguments both backends accept; anything else → ``ValidationFailed``."""
    errors: dict[str, list[str]] = {}
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
        errors["after"] = ["Must be a non-negative integer (the id of the last file seen)."]
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        errors["limit"] = [f"Must be an integer from 1 to {MAX_PAGE_SIZE}."]
    if errors:
        raise ValidationFailed(errors)


def check_file_specs(files: Any) -> list[Mapping[str, Any]]:
    """The files of a ``register_files`` call as a list; an item that is not a mapping → 400."""
    if isinstance(files, Mapping | str | bytes):
        raise ValidationFailed({"files": ["Must be a list of objects."]})
    out = list(files)
    for i, f in enumerate(out):
        if not isinstance(f, Mapping):
            raise ValidationFailed({f"files[{i}]": ["Must be an object."]})
    return out


def iter_files(
    client: DSMClient,
    dataset_uid: UIDLike,
    *,
    after: int | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
) -> Iterator[FileInfo]:
    """Every file of a dataset with ``id > after``, page by page, each exactly once."""
    cursor = after
    while True:
        page = client.list_files(dataset_uid, after=cursor, limit=limit)
        yield from page.files
        if page.next_cursor is None:
            return
        if cursor is not None and page.next_cursor <= cursor:
            raise DSMError(
                f"The DSM's file cursor did not advance ({cursor} → {page.next_cursor}) "
                f"while listing dataset {dataset_uid}."
            )
        cursor = page.next_cursor


def get_dsm(backend: str | None = None) -> DSMClient:
    """A client of ``backend`` (default ``settings.WMS_DSM_BACKEND``), configured from settings.

    A new client per call: an ``http`` client holds a ``requests.Session``, which is not meant to
    be shared between threads. Close it (or use it as a context manager) when done.
    """
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    name = backend or getattr(settings, "WMS_DSM_BACKEND", "local")
    if name == "local":
        from files.dsm.local import LocalDSMClient

        return LocalDSMClient()
    if name == "http":
        from files.dsm.http import HTTPDSMClient

        url = getattr(settings, "WMS_DSM_URL", "")
        if not url:
            raise ImproperlyConfigured(
                "WMS_DSM_BACKEND=http needs WMS_DSM_URL (the DSM's base URL)."
            )
        return HTTPDSMClient(
            url,
            token=getattr(settings, "WMS_DSM_TOKEN", ""),
            timeout=getattr(settings, "WMS_DSM_TIMEOUT", (3.05, 30.0)),
            retries=getattr(settings, "WMS_DSM_RETRIES", 3),
            backoff=getattr(settings, "WMS_DSM_BACKOFF", 0.5),
        )
    raise ImproperlyConfigured(f"WMS_DSM_BACKEND must be one of {BACKENDS}, not {name!r}.")
