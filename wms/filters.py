"""Query filters every API shares (django-filter).

:func:`text_filter` is the filter of a text column: a value longer than the column answers
400 naming the parameter (no row could match it), and the schema gives its ``maxLength``.

:class:`IdFilter` is the filter of an id (``?task=<id>``, ``?pilot=<id>``, ...): an integer in
the range of a primary key (``1`` to ``2**63 - 1``, a Postgres ``bigint``). Anything else
(``1.5``, ``abc``, ``2**64``) answers 400 naming the parameter, and the schema says so.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from drf_spectacular.drainage import set_override
from drf_spectacular.utils import extend_schema_field

MAX_ID = 2**63 - 1


class IdField(forms.IntegerField):
    def __init__(self, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(**kwargs)


@extend_schema_field({"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_ID})
class IdFilter(django_filters.NumberFilter):
    """The id of a row: an integer from 1 to ``2**63 - 1``."""

    field_class = IdField


def text_filter(model: type, field: str, **kwargs: Any) -> django_filters.CharFilter:
    """A ``CharFilter`` on ``model.field`` bounded by the column's ``max_length``."""
    max_length = model._meta.get_field(field).max_length  # type: ignore[attr-defined]
    kwargs.setdefault("field_name", field)
    text = django_filters.CharFilter(max_length=max_length, **kwargs)
    set_override(text, "field", {"type": "string", "maxLength": max_length})
    return text


class FilterSet(django_filters.FilterSet):
    """The API's filter sets: a parameter that takes one value given twice (``?site=a&site=b``)
    answers 400 naming it, rather than the last value silently winning."""

    def is_valid(self) -> bool:
        valid = super().is_valid()
        getlist = getattr(self.data, "getlist", None)
        if getlist is None:
            return valid
        for name, flt in self.filters.items():
            if not isinstance(flt, django_filters.MultipleChoiceFilter) and len(getlist(name)) > 1:
                self.form.add_error(name, "Give this parameter once.")  # type: ignore[union-attr]
                valid = False
        return valid
