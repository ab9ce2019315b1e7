"""Query filters of the files and datasets API (django-filter)."""

import django_filters

from files.models import Dataset, DatasetRole, DatasetState, File, FileStatus, FileType


class FileFilter(django_filters.FilterSet):
    """``?job=<id>``, ``?task=<id>``, ``?type=``, ``?dataset=<uid>``, ``?status=``."""

    job = django_filters.NumberFilter(field_name="job_id", help_text="The job's id.")
    task = django_filters.NumberFilter(field_name="task_id", help_text="The task's id.")
    type = django_filters.ChoiceFilter(choices=FileType.choices)
    dataset = django_filters.UUIDFilter(field_name="dataset__uid", help_text="The dataset's uid.")
    status = django_filters.ChoiceFilter(choices=FileStatus.choices)

    class Meta:
        model = File
        fields = ["job", "task", "type", "dataset", "status"]


class DatasetFilter(django_filters.FilterSet):
    """``?state=``, ``?role=``, ``?name=`` (exact) and ``?name__icontains=``."""

    state = django_filters.ChoiceFilter(choices=DatasetState.choices)
    role = django_filters.ChoiceFilter(choices=DatasetRole.choices)

    class Meta:
        model = Dataset
        fields = {"name": ["exact", "icontains"]}
