"""The DSM interface (``files.dsm.base``) and :func:`get_dsm`, which picks a client by settings.

The clients (``files.dsm.local``, ``files.dsm.http``) import ``files.dsm.base``, never this
package, so the package and its modules form no import circle.
"""

from __future__ import annotations

from files.dsm.base import (
    BACKENDS,
    DEFAULT_PAGE_SIZE,
    MAX_FIND,
    MAX_PAGE_SIZE,
    MAX_PATTERN_LENGTH,
    ROLES,
    STATES,
    WILDCARDS,
    ClientBase,
    DatasetInfo,
    DatasetSpec,
    DSMClient,
    FileInfo,
    FilePage,
    UIDLike,
    check_file_specs,
    check_file_urls,
    check_find_args,
    check_page_args,
    glob_prefix,
    glob_regex,
    iter_files,
    pattern_errors,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_PAGE_SIZE",
    "MAX_FIND",
    "MAX_PAGE_SIZE",
    "MAX_PATTERN_LENGTH",
    "ROLES",
    "STATES",
    "WILDCARDS",
    "ClientBase",
    "DSMClient",
    "DatasetInfo",
    "DatasetSpec",
    "FileInfo",
    "FilePage",
    "UIDLike",
    "__all__",
    "check_file_specs",
    "check_file_urls",
    "check_find_args",
    "check_page_args",
    "get_dsm",
    "glob_prefix",
    "glob_regex",
    "iter_files",
    "pattern_errors",
]


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
        from files.storage import output_root, storage_roots

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
            # inputs under the storage roots, outputs inside the output root (the client
            # does not know a dataset's role; the report path checked the task's place)
            url_roots=(*storage_roots(), output_root()),
        )
    raise ImproperlyConfigured(f"WMS_DSM_BACKEND must be one of {BACKENDS}, not {name!r}.")
