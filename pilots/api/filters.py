"""Query filters of the pilots API (django-filter)."""

import django_filters

from pilots.models import Pilot, PilotState
from wms.choices import DeviceType
from wms.filters import FilterSet, text_filter


class PilotFilter(FilterSet):
    """``?state=idle&state=busy`` (any of), ``?device_type=``, ``?site=``, ``?hostname=``."""

    state = django_filters.MultipleChoiceFilter(choices=PilotState.choices)
    device_type = django_filters.ChoiceFilter(choices=DeviceType.choices)
    site = text_filter(Pilot, "site")
    hostname = text_filter(Pilot, "hostname")

    class Meta:
        model = Pilot
        fields = ["state", "device_type", "site", "hostname"]
