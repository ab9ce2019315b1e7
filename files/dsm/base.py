"""The Data Storage Manager (DSM) interface; ``files.dsm.get_dsm`` picks a backend.

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

import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from wms.exceptions import DSMError, ValidationFailed

__all__ = [
    "BACKENDS",
    "DEFAULT_PAGE_SIZE",
    "MAX_FIND",
    "MAX_PAGE_SIZE",
    "MAX_PATTERN_LENGTH",
    "ROLES",
    "STATES",
    "ClientBase",
    "DSMClient",
    "DatasetInfo",
    "DatasetSpec",
    "FileInfo",
    "FilePage",
    "UIDLike",
    "check_file_urls",
    "check_find_args",
    "glob_prefix",
    "glob_regex",
    "iter_files",
    "pattern_errors",
]

ROLES = ("input", "output")
STATES = ("open", "closed")
BACKENDS = ("local", "http")
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
MAX_FIND = 10_000  # the most datasets one find_datasets call returns
MAX_PATTERN_LENGTH = 255  # as a dataset name
WILDCARDS = frozenset("*?")

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

    def find_datasets(
        self, pattern: str, *, role: str | None = "input", limit: int = DEFAULT_PAGE_SIZE
    ) -> list[DatasetInfo]:
        """The datasets whose name matches ``pattern``, of ``role`` (None: any), by name.

        ``pattern`` is a glob over the whole name: ``*`` any run of characters (also none),
        ``?`` exactly one character, everything else literal (``.``, ``_``, ``%``, ``[``,
        ``\\`` ...), case-sensitive. Ordered by name in code-point order, at most ``limit``
        (1..``MAX_FIND``). The state is not a filter: closed datasets match too. A blank
        pattern, one of wildcards only (the whole catalogue), a bad role or limit →
        ``ValidationFailed``.
        """
        ...

    #: The DSM's file ids are the WMS's own catalogue entry ids (the ``local`` backend): a
    #: FILE_DAT row can point at a registered file's entry as it is.
    catalogue_is_local: bool

    def catalogue_entries(
        self, info: DatasetInfo, files: Sequence[FileInfo]
    ) -> tuple[int, dict[int, int]]:
        """The local catalogue rows that FILE_DAT input rows point at, for these files of the
        dataset ``info``: the local dataset's id and DSM file id → local entry id. The
        ``local`` backend looks them up; an external DSM's are mirrored into the local
        tables (idempotent, in the caller's transaction: a database write, no DSM call)."""
        ...

    def close(self) -> None:
        """Release the client's resources (connections); the client is unusable afterwards."""
        ...

    def __enter__(self) -> Self:
        """``with get_dsm() as dsm:`` gives the client itself."""
        ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``close()`` on the way out; exceptions propagate."""
        ...


class ClientBase:
    """What both backends share: use as a context manager, ``close()`` when done."""

    catalogue_is_local = False

    def catalogue_entries(
        self, info: DatasetInfo, files: Sequence[FileInfo]
    ) -> tuple[int, dict[int, int]]:
        """An external DSM's dataset and files, mirrored into the local catalogue tables."""
        from files.services import catalogue_mirror

        ds, mapping = catalogue_mirror(info=info, files=list(files))
        return ds.pk, mapping

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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


def pattern_errors(pattern: Any) -> list[str]:
    """What is wrong with a dataset-name glob for :meth:`DSMClient.find_datasets` ([] if fine)."""
    if not isinstance(pattern, str):
        return ["Must be a string (a glob of dataset names)."]
    if not pattern.strip():
        return ["This field may not be blank."]
    if len(pattern) > MAX_PATTERN_LENGTH:
        return [f"Ensure this field has no more than {MAX_PATTERN_LENGTH} characters."]
    if "\x00" in pattern:
        return ["Must not contain NUL characters."]
    if set(pattern) <= WILDCARDS:
        return [
            "A pattern of wildcards only would select the whole catalogue: "
            "give at least one literal character."
        ]
    return []


def check_find_args(pattern: Any, role: Any, limit: Any) -> None:
    """The ``find_datasets`` arguments both backends accept; any other → ``ValidationFailed``."""
    errors: dict[str, list[str]] = {}
    problems = pattern_errors(pattern)
    if problems:
        errors["pattern"] = problems
    if role is not None and role not in ROLES:
        errors["role"] = [f"Must be one of {list(ROLES)} or None (any role)."]
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_FIND:
        errors["limit"] = [f"Must be an integer from 1 to {MAX_FIND}."]
    if errors:
        raise ValidationFailed(errors)


def glob_prefix(pattern: str) -> str:
    """The literal start of a glob, up to its first wildcard (``run2026.*.raw`` → ``run2026.``)."""
    for i, ch in enumerate(pattern):
        if ch in WILDCARDS:
            return pattern[:i]
    return pattern


def glob_regex(pattern: str) -> str:
    """A regular expression matching exactly the names a glob matches, the whole name.

    Written in the subset where Python's ``re`` (SQLite's REGEXP in Django) and PostgreSQL's
    AREs agree: ``(?s)`` (``.`` matches a newline too; the default of an ARE), ``\\A``/``\\Z``
    anchors (``$`` would also match before a final newline in Python), ``.`` / ``.*`` for the
    wildcards, and every other character literal: ``re.escape`` puts a backslash before ASCII
    punctuation and whitespace only, which both engines read as the character itself.
    """
    out: list[str] = []
    for ch in pattern:
        if ch == "*":
            if not out or out[-1] != ".*":  # a run of stars is one star
                out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "(?s)\\A" + "".join(out) + "\\Z"


def check_file_specs(files: Any) -> list[Mapping[str, Any]]:
    """The files of a ``register_files`` call as a list; an item that is not a mapping → 400."""
    if isinstance(files, Mapping | str | bytes):
        raise ValidationFailed({"files": ["Must be a list of objects."]})
    out = list(files)
    for i, f in enumerate(out):
        if not isinstance(f, Mapping):
            raise ValidationFailed({f"files[{i}]": ["Must be an object."]})
    return out


def check_file_urls(files: Sequence[Mapping[str, Any]], roots: Sequence[str]) -> None:
    """Every file's ``url`` (when given) lies under one of ``roots`` (canonical URLs), else
    ``ValidationFailed`` naming ``files[i].url``: nothing is sent to the DSM."""
    from wms.locations import LocationError, under_any

    errors: dict[str, Any] = {}
    for i, f in enumerate(files):
        url = f.get("url") or ""
        if not url:
            continue
        if not isinstance(url, str):
            errors[f"files[{i}]"] = {"url": ["Must be a string."]}
            continue
        try:
            ok = under_any(url, roots) is not None
            problem = f"{url} is not under an allowed storage root ({', '.join(roots)})."
        except LocationError as exc:
            ok, problem = False, f"Not a usable URL: {exc}"
        if not ok:
            errors[f"files[{i}]"] = {"url": [problem]}
    if errors:
        raise ValidationFailed(errors)


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
