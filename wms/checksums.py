"""Content checksums as the WMS stores them: ``<algorithm>:<hex>`` (adler32 as in HEP, or sha256).

Django-free: the pilot agent imports this module too.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path

ALGORITHMS = ("adler32", "sha256", "md5")
_HEX_LEN = {"adler32": 8, "sha256": 64, "md5": 32}
_RE = re.compile(r"^(adler32|sha256|md5):([0-9a-f]+)$")


def is_valid(value: str) -> bool:
    """True for ``adler32:0a1b2c3d`` / ``sha256:<64 hex>`` / ``md5:<32 hex>`` (lower case)."""
    m = _RE.fullmatch(value or "")  # fullmatch: "$" alone lets a trailing newline through
    return m is not None and len(m.group(2)) == _HEX_LEN[m.group(1)]


def file_checksum(path: str | Path, algorithm: str = "adler32", chunk: int = 1 << 20) -> str:
    """The checksum of a file's content, read in chunks."""
    with open(path, "rb") as fh:
        return bytes_checksum_stream(iter(lambda: fh.read(chunk), b""), algorithm)


def bytes_checksum(data: bytes, algorithm: str = "adler32") -> str:
    return bytes_checksum_stream([data], algorithm)


def bytes_checksum_stream(chunks, algorithm: str = "adler32") -> str:
    if algorithm == "adler32":
        value = 1
        for c in chunks:
            value = zlib.adler32(c, value)
        return f"adler32:{value & 0xFFFFFFFF:08x}"
    if algorithm in ("sha256", "md5"):
        h = hashlib.new(algorithm)
        for c in chunks:
            h.update(c)
        return f"{algorithm}:{h.hexdigest()}"
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; use one of {ALGORITHMS}")
