"""The API's request parsers (DRF's ``DEFAULT_PARSER_CLASSES``): hostile bodies answer 400.

On top of DRF's own parsers they refuse, before a view sees the data:

- JSON nested deeper than ``WMS_API_MAX_JSON_DEPTH`` (400 ``parse_error``), checked without
  recursion before decoding (Python's decoder would raise ``RecursionError`` at ~1,000 levels,
  and the code after it recurses too);
- the NUL character in any JSON string, object keys included, and in form fields and values
  (400 ``validation_failed`` naming the field): PostgreSQL cannot store it in text;
- non-finite numbers (``NaN``, ``Infinity``, ``-Infinity``, and literals such as ``1e400``
  that overflow to infinity), 400 ``validation_failed`` naming the field.

The checks cost next to nothing on ordinary bodies: the depth scan runs only when the body
holds more brackets than the limit, the field walk only when the body holds ``\\u0000`` or a
non-finite number was decoded. The body's size is bounded before it is read
(``wms.middleware.ApiRequestGuard``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import QueryDict
from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError

NUL_MESSAGE = "The NUL character is not allowed."
NON_FINITE_MESSAGE = "Numbers must be finite (no NaN, Infinity or overflowing literal)."
MAX_REPORTED = 20  # offending fields named in one answer

# The skeleton of a JSON text: brackets as "(" and ")", quotes kept, every other ASCII
# character dropped.
_SKELETON = {c: None for c in range(128)} | {
    ord("["): "(",
    ord("{"): "(",
    ord("]"): ")",
    ord("}"): ")",
    ord('"'): '"',
}


def json_too_deep(text: str, limit: int) -> bool:
    """Does the JSON text nest arrays/objects deeper than ``limit``? Without recursion and in
    C-speed string operations: skipped when the text holds at most ``limit`` opening
    brackets; otherwise the brackets outside strings are kept (escaped quotes dropped first,
    then each string, bracket-free ones in one pass) and innermost pairs removed ``limit``
    times: a pair left is one level too many. (Unbalanced text is not JSON: the decoder
    refuses it, and its recursion is bounded anyway.)"""
    if text.count("[") + text.count("{") <= limit:
        return False
    if "\\" in text:
        text = text.replace("\\\\", "").replace('\\"', "")
    # '""' is an empty string, or the end of a string and the start of the next with no
    # bracket between: dropping it merges two strings, whose insides are dropped anyway.
    brackets = text.translate(_SKELETON).replace('""', "")
    if '"' in brackets:
        brackets = "".join(brackets.split('"')[::2])
    if "(" * (limit + 1) in brackets:
        return True
    for _ in range(limit):
        shorter = brackets.replace("()", "")
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return "()" in brackets


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _offences(data: Any) -> Iterator[tuple[str, str]]:
    """``(field path, message)`` for every NUL-bearing string or key and every non-finite
    number of decoded JSON, depth first, without recursion."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            children = []
            for key, child in value.items():
                child_path = _path(path, key)
                if "\x00" in key:
                    yield child_path, NUL_MESSAGE
                children.append((child_path, child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(_path(path, i), child) for i, child in enumerate(value)]))
        elif isinstance(value, str):
            if "\x00" in value:
                yield path or "non_field_errors", NUL_MESSAGE
        elif isinstance(value, float) and not math.isfinite(value):
            yield path or "non_field_errors", NON_FINITE_MESSAGE


def _refuse(offences: Iterator[tuple[str, str]]) -> None:
    errors: dict[str, list[str]] = {}
    for path, message in offences:
        errors.setdefault(path, []).append(message)
        if len(errors) >= MAX_REPORTED:
            break
    if errors:
        raise ValidationError(errors)


def json_loads(text: str) -> Any:
    """Decode an API body: depth, NUL and non-finite numbers checked as the module says.

    Every float literal goes through a check (overflow to infinity is only known once
    converted: ``1e400``, or 400 digits); the decoded data is walked for the offending
    fields only when the text holds a NUL escape or a non-finite number was decoded."""
    limit = settings.WMS_API_MAX_JSON_DEPTH
    if json_too_deep(text, limit):
        raise ParseError(f"JSON parse error - nested deeper than {limit} levels.")
    non_finite = False

    def parse_float(literal: str) -> float:
        nonlocal non_finite
        value = float(literal)
        if value - value != 0.0:  # inf or nan
            non_finite = True
        return value

    def parse_constant(literal: str) -> float:
        nonlocal non_finite
        non_finite = True
        return float(literal)

    try:
        data = json.loads(text, parse_float=parse_float, parse_constant=parse_constant)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"JSON parse error - {exc}") from None
    if non_finite or "\\u0000" in text:
        _refuse(_offences(data))
    return data


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser with the checks of :func:`json_loads`."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        raw = stream.read() if stream is not None else b""
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        return json_loads(text)


def refuse_nul_fields(data: QueryDict) -> None:
    """400 naming every form field whose name or value holds the NUL character."""
    _refuse(
        (key, NUL_MESSAGE)
        for key, values in data.lists()
        if "\x00" in key or any(isinstance(v, str) and "\x00" in v for v in values)
    )


class FormParser(parsers.FormParser):
    """Form-encoded bodies: Django's field-count limit (``DATA_UPLOAD_MAX_NUMBER_FIELDS``)
    and no NUL in names or values."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        refuse_nul_fields(data)
        return data


class MultiPartParser(parsers.MultiPartParser):
    """Multipart bodies: as :class:`FormParser` for their fields (files are not read here)."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        result = super().parse(stream, media_type, parser_context)
        refuse_nul_fields(result.data)
        return result
