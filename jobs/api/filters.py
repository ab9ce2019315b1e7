"""Query filters of the jobs API (django-filter)."""

import django_filters

from jobs.models import Job, JobState
from wms.choices import DeviceType, Mode
from wms.filters import FilterSet, IdFilter


class JobFilter(FilterSet):
    """``?task=<id>``, ``?state=queued&state=running`` (any of), ``?device_type=``,
    ``?pilot=<id>``, ``?mode=``."""

    task = IdFilter(field_name="task_id", help_text="The task's id.")
    state = django_filters.MultipleChoiceFilter(choices=JobState.choices)
    device_type = django_filters.ChoiceFilter(choices=DeviceType.choices)
    pilot = IdFilter(field_name="pilot_id", help_text="The pilot's id.")
    mode = django_filters.ChoiceFilter(choices=Mode.choices)

    class Meta:
        model = Job
        fields = ["task", "state", "device_type", "pilot", "mode"]
