"""Where data may live: URL normalisation and "is this URL under that root".

Django-free on purpose: the server (storage roots, the output root, pilots' reports) and the
pilot agent (stage-in, stage-out) import it and apply the same rules, each on its own side.

A URL is compared in its **canonical form** (:func:`canonical_url`): the scheme and host in
lower case, ``file://localhost/`` as ``file:///``, the path percent-decoded, its empty
(doubled slashes) and ``.`` segments dropped and its ``..`` segments applied, no trailing
slash, then percent-encoded again one way only. An absolute POSIX path (``/data/x``) is read as
the ``file://`` URL of that path. What cannot be read this way (no scheme, a relative path, a
``..`` above the top, a query, a fragment, user info, a backslash, control characters, an
encoded ``/`` or NUL) is refused with :class:`LocationError`, never guessed at.

A URL lies under a root when its canonical form equals the root's or continues it with ``/``:
``file:///data/in/a.root`` is under ``file:///data/in``, ``file:///data/input2/a.root`` is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import quote, unquote, urlsplit

MAX_URL = 4096

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
_NAME_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# Characters a canonical path keeps as they are (RFC 3986 unreserved, sub-delims, ':' '@').
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


class LocationError(ValueError):
    """A URL that cannot be normalised, or that lies outside where it must be."""


def _bad_chars(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# A file:// URL already in canonical form but for a trailing slash (what pilots report and
# the WMS stores): taken as it is, without the full parse (a report's hot path).
_PLAIN_FILE = re.compile(r"file:///[A-Za-z0-9._~!$&'()*+,;=:@/-]*\Z")


def canonical_url(url: str) -> str:
    """The canonical form of ``url`` (see the module's docstring), or ``LocationError``."""
    if (
        isinstance(url, str)
        and _PLAIN_FILE.match(url)
        and "//" not in url[7:]
        and "/./" not in url
        and "/../" not in url
        and not url.endswith(("/.", "/.."))
    ):
        return url.rstrip("/") if len(url) > 8 else url
    if not isinstance(url, str) or not url.strip():
        raise LocationError("Must be a URL (file:///..., root://host//..., ...).")
    if len(url) > MAX_URL:
        raise LocationError(f"At most {MAX_URL} characters.")
    if _bad_chars(url) or "\\" in url:
        raise LocationError("Must not contain control characters or backslashes.")
    if url.startswith("/"):
        url = "file://" + quote(url, safe=_PATH_SAFE + "%")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme or not _SCHEME.match(scheme) or not url[len(scheme) :].startswith("://"):
        raise LocationError(
            "Must be an absolute URL with a scheme and '//' (file:///data/..., "
            "root://host//data/...) or an absolute path."
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise LocationError("Must not have a query or a fragment.")
    netloc = parts.netloc.lower()
    if "@" in netloc:
        raise LocationError("Must not carry user information (user@host).")
    if scheme == "file" and netloc in ("", "localhost"):
        netloc = ""
    elif not netloc:
        raise LocationError(f"A {scheme}:// URL must name a host.")
    raw_segments = parts.path.split("/")
    segments: list[str] = []
    for raw in raw_segments:
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError as exc:
            raise LocationError("Must be percent-encoded UTF-8.") from exc
        if "/" in seg or "\\" in seg or _bad_chars(seg):
            raise LocationError(
                "Must not encode '/', a backslash or control characters (%2F, %5C, %00, ...)."
            )
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segments:
                raise LocationError("Its '..' segments climb above the top of the path.")
            segments.pop()
            continue
        segments.append(seg)
    path = "/" + "/".join(quote(s, safe=_PATH_SAFE.replace("/", "")) for s in segments)
    return f"{scheme}://{netloc}{path}"


def canonical_roots(roots: Iterable[str]) -> tuple[str, ...]:
    """The canonical forms of configured roots; one that cannot be normalised is an error."""
    out = []
    for root in roots:
        root = root.strip()
        if not root:
            continue
        try:
            out.append(canonical_url(root))
        except LocationError as exc:
            raise LocationError(f"Root {root!r}: {exc}") from exc
    return tuple(out)


def is_under(canonical: str, root: str) -> bool:
    """Whether a canonical URL is ``root`` itself or lies below it (both canonical)."""
    if root.endswith("/"):  # a root at the top of a host: scheme://host/
        return canonical.startswith(root) or canonical == root[:-1]
    return canonical == root or canonical.startswith(root + "/")


def under_any(url: str, roots: Sequence[str]) -> str | None:
    """The canonical form of ``url`` if it lies under one of ``roots`` (canonical), else None.

    ``LocationError`` when ``url`` cannot be normalised."""
    canonical = canonical_url(url)
    for root in roots:
        if is_under(canonical, root):
            return canonical
    return None


def overlaps(a: str, b: str) -> bool:
    """Whether two canonical places share files: equal, or one lies below the other."""
    return is_under(a, b) or is_under(b, a)


def ancestors(canonical: str) -> list[str]:
    """Every canonical URL a canonical URL lies under, itself included, top first
    (``file:///a/b`` → ``file:///``, ``file:///a``, ``file:///a/b``)."""
    head, _, path = canonical.partition("://")
    host, _, rest = path.partition("/")
    top = f"{head}://{host}/"
    out = [top]
    segments = [s for s in rest.split("/") if s]
    for i in range(1, len(segments) + 1):
        out.append(top + "/".join(segments[:i]))
    return out


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain relative file name (None when it is one).

    A plain relative name is one or more ``/``-separated segments, none of them empty, ``.``
    or ``..``: ``hist.json``, ``plots/pt.png``. No absolute path, no scheme (``file:x``), no
    backslash, no control character."""
    if not isinstance(name, str) or not name:
        return "Must be a non-empty relative name."
    if _bad_chars(name) or "\\" in name:
        return "Must not contain control characters or backslashes."
    if name.startswith("/"):
        return "Must be a relative name, not an absolute path."
    if _NAME_SCHEME.match(name):
        return "Must be a relative name, not a URL (no 'scheme:' in front)."
    for seg in name.split("/"):
        if seg in ("", ".", ".."):
            return "Must be a plain relative name: no empty, '.' or '..' segment."
    return None
