"""Query filters of the files and datasets API (django-filter)."""

import django_filters
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from files.dsm import pattern_errors
from files.dsm.local import name_matches
from files.models import Dataset, DatasetRole, DatasetState, File, FileStatus, FileType
from wms.filters import FilterSet, IdFilter, text_filter


class FileFilter(FilterSet):
    """``?job=<id>``, ``?task=<id>``, ``?type=``, ``?dataset=<uid>``, ``?status=``."""

    job = IdFilter(field_name="job_id", help_text="The job's id.")
    task = IdFilter(field_name="task_id", help_text="The task's id.")
    type = django_filters.ChoiceFilter(choices=FileType.choices)
    dataset = django_filters.UUIDFilter(field_name="dataset__uid", help_text="The dataset's uid.")
    status = django_filters.ChoiceFilter(choices=FileStatus.choices)

    class Meta:
        model = File
        fields = ["job", "task", "type", "dataset", "status"]


def validate_name_glob(value: str) -> None:
    problems = pattern_errors(value)
    if problems:
        raise ValidationError(problems)


class DatasetFilter(FilterSet):
    """``?state=``, ``?role=``, ``?name=`` (exact), ``?name__icontains=`` and ``?name__glob=``
    (the DSM's dataset selection, ``files.dsm.DSMClient.find_datasets``)."""

    state = django_filters.ChoiceFilter(choices=DatasetState.choices)
    role = django_filters.ChoiceFilter(choices=DatasetRole.choices)
    name = text_filter(Dataset, "name", help_text="The whole name.")
    name__icontains = text_filter(
        Dataset, "name", lookup_expr="icontains", help_text="A part of the name, any case."
    )
    name__glob = text_filter(
        Dataset,
        "name",
        method="filter_name_glob",
        strip=False,  # the glob as given, like find_datasets (a blank one is refused)
        validators=[validate_name_glob],
        help_text="A glob of the whole name, case-sensitive: `*` any run of characters, `?` "
        "one character, everything else literal (e.g. `run2026.*.raw`). A pattern of "
        "wildcards only is refused.",
    )

    def filter_name_glob(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return queryset.filter(name_matches(value))

    class Meta:
        model = Dataset
        fields = ["state", "role", "name", "name__icontains", "name__glob"]
