"""Query filters of the tasks API (django-filter)."""

import django_filters

from tasks.models import Task, TaskState
from wms.choices import DeviceType, Mode
from wms.filters import FilterSet, IdFilter


class TaskFilter(FilterSet):
    """``?state=running&state=paused`` (any of), ``?device_type=``, ``?mode=``, ``?owner=<id>``."""

    state = django_filters.MultipleChoiceFilter(choices=TaskState.choices)
    device_type = django_filters.ChoiceFilter(choices=DeviceType.choices)
    mode = django_filters.ChoiceFilter(choices=Mode.choices)
    owner = IdFilter(field_name="owner_id", help_text="The owner's user id.")

    class Meta:
        model = Task
        fields = ["state", "device_type", "mode", "owner"]
