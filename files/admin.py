"""Admin of the DSM catalogue (datasets, their entries) and of FILE_DAT (a job's files).

Datasets are registered through ``files.services.dataset_register`` and closed by an action
(``dataset_close``); catalogue entries are added through ``dataset_add_files``. Nothing else is
edited here: FILE_DAT rows are written by the jobs that own them.
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html

from files import services
from files.models import (
    Dataset,
    DatasetEntry,
    DatasetRole,
    DatasetState,
    DatasetTransition,
    File,
)
from files.storage import check_url_under, output_root, storage_roots
from wms import checksums
from wms.admin import (
    ADMIN_SOURCE,
    IdSearchMixin,
    ReadOnlyAdminMixin,
    ServiceWriteAdminMixin,
    TransitionInline,
    TransitionLogAdmin,
    WMSAdminMedia,
    admin_changelist_url,
    admin_link,
    admin_reason,
    copy_into,
    run_service_action,
    state_badge,
)
from wms.exceptions import Conflict, WMSError


class DatasetTransitionInline(TransitionInline):
    model = DatasetTransition


DATASET_ADD_FIELDS = ("name", "role", "location")


@admin.register(Dataset)
class DatasetAdmin(ServiceWriteAdminMixin, IdSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "name",
        "uid",
        "role",
        "state_badge",
        "owner",
        "file_count",
        "size_human",
        "created_at",
        "closed_at",
    )
    list_select_related = ("owner",)
    list_display_links = ("id", "name")
    list_filter = ("state", "role", "created_at")
    search_fields = ("name",)
    uuid_search_fields = ("uid",)
    date_hierarchy = "created_at"
    ordering = ("-id",)
    actions = ("close_datasets",)
    inlines = (DatasetTransitionInline,)
    Media = WMSAdminMedia
    change_fieldsets = (
        (None, {"fields": ("name", "uid", "role", "state_badge", "owner", "location")}),
        ("Content", {"fields": ("file_count", "size_human", "entries_link", "job_files_link")}),
        ("Times", {"fields": ("created_at", "updated_at", "state_changed_at", "closed_at")}),
    )

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return ((None, {"fields": DATASET_ADD_FIELDS}),)
        return self.change_fieldsets

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return tuple(f for _, opts in self.change_fieldsets for f in opts["fields"])

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else ()

    def has_change_permission(self, request, obj=None):
        # Registered through dataset_register, closed by the action: no service edits a dataset.
        return False

    def save_model(self, request, obj, form, change):
        if change:  # unreachable: the change form is view-only
            return
        ds = services.dataset_register(
            **{f: form.cleaned_data[f] for f in DATASET_ADD_FIELDS}, owner=request.user
        )
        copy_into(obj, ds)

    def get_search_results(self, request, queryset, search_term):
        qs, dup = super().get_search_results(request, queryset, search_term)
        # The autocomplete of the "add a catalogue entry" form offers open datasets only.
        if request.GET.get("model_name") == "datasetentry":
            qs = qs.filter(state=DatasetState.OPEN)
        return qs, dup

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="size", ordering="total_size")
    def size_human(self, obj):
        return filesizeformat(obj.total_size)

    @admin.display(description="catalogue entries")
    def entries_link(self, obj):
        return format_html(
            '<a href="{}">{} entries</a>',
            admin_changelist_url(DatasetEntry, dataset__id__exact=obj.pk),
            obj.file_count,
        )

    @admin.display(description="job files")
    def job_files_link(self, obj):
        return format_html(
            '<a href="{}">job files in this dataset</a>',
            admin_changelist_url(File, dataset__id__exact=obj.pk),
        )

    @admin.action(description="Close selected datasets", permissions=["manage"])
    def close_datasets(self, request, queryset):
        reason = admin_reason(request, "closed")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "uid", "name", "state"),
            lambda ds: _admin_close(ds, reason),
            done="closed",
            unchanged="already closed",
            log_message="Closed (admin action).",
        )


# Why the admin may not close a dataset, added by the apps that know (the tasks app: "the
# output dataset of a task that may still run jobs"): each takes the dataset and answers a
# reason, or None. files imports no app above it, so they register here (their admin module).
CLOSE_REFUSALS: list[Callable[[Dataset], str | None]] = []


def _admin_close(ds: Dataset, reason: str):
    """The admin's close, unless one of ``CLOSE_REFUSALS`` refuses it (409)."""
    for refusal in CLOSE_REFUSALS:
        why = refusal(ds)
        if why:
            raise Conflict(why)
    return services.dataset_close(dataset=ds, source=ADMIN_SOURCE, reason=reason)


def _related(model, field: str):
    """The model a foreign key points at (files names the apps above it by relation only)."""
    return model._meta.get_field(field).related_model


ENTRY_ADD_FIELDS = ("dataset", "name", "size", "check_sum", "url")


class DatasetEntryAdminForm(forms.ModelForm):
    """Checks what the service would refuse, so the operator gets field errors (reads only)."""

    class Meta:
        model = DatasetEntry
        fields = ENTRY_ADD_FIELDS

    def clean_check_sum(self):
        value = self.cleaned_data.get("check_sum") or ""
        if value and not checksums.is_valid(value):
            raise forms.ValidationError("Must be '<adler32|sha256|md5>:<hex>' in lower case.")
        return value

    def clean_dataset(self):
        ds = self.cleaned_data["dataset"]
        if ds is not None and ds.state != DatasetState.OPEN:
            raise forms.ValidationError(f"Dataset {ds.name} is closed and takes no more files.")
        return ds

    def clean(self):
        cleaned = super().clean()
        ds, url = cleaned.get("dataset"), cleaned.get("url")
        if ds is not None and url:
            roots = storage_roots() if ds.role == DatasetRole.INPUT else (output_root(),)
            try:
                check_url_under(url, roots, field="url", what="an allowed storage root")
            except WMSError as exc:
                self.add_error("url", exc.detail["url"])
        return cleaned


@admin.register(DatasetEntry)
class DatasetEntryAdmin(ServiceWriteAdminMixin, IdSearchMixin, admin.ModelAdmin):
    form = DatasetEntryAdminForm
    list_display = ("id", "name", "dataset_link", "size_human", "check_sum", "created_at")
    list_display_links = ("id", "name")
    list_filter = ("created_at",)
    search_fields = ("name", "check_sum")
    id_search_fields = ("pk", "dataset_id")
    list_select_related = ("dataset",)
    autocomplete_fields = ("dataset",)
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # no per-filter COUNT over a big table
    Media = WMSAdminMedia

    def get_fields(self, request, obj=None):
        if obj is None:
            return ENTRY_ADD_FIELDS
        return ("dataset", "name", "size_human", "check_sum", "url", "created_at")

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.get_fields(request, obj)

    def has_change_permission(self, request, obj=None):
        return False  # no service edits a catalogue entry

    def save_model(self, request, obj, form, change):
        if change:  # unreachable: the change form is view-only
            return
        data = form.cleaned_data
        (entry,) = services.dataset_add_files(
            dataset=data["dataset"],
            files=[{f: data[f] for f in ("name", "size", "check_sum", "url")}],
        )
        copy_into(obj, entry)

    @admin.display(description="dataset", ordering="dataset_id")
    def dataset_link(self, obj):
        return admin_link(Dataset, obj.dataset_id, obj.dataset.name)

    @admin.display(description="size", ordering="size")
    def size_human(self, obj):
        return filesizeformat(obj.size)


@admin.register(File)
class FileAdmin(ReadOnlyAdminMixin, IdSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "file_name",
        "type",
        "status_badge",
        "intermediate",
        "size_human",
        "job_link",
        "task_link",
        "dataset_link",
        "created_at",
    )
    list_display_links = ("id", "file_name")
    list_filter = ("type", "status", "intermediate", "created_at")
    search_fields = ("file_name", "check_sum")
    id_search_fields = ("pk", "job_id", "task_id")
    list_select_related = ("task", "dataset")
    raw_id_fields = ("job", "task", "dataset", "entry")
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # no per-filter COUNT over a big table
    Media = WMSAdminMedia
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "file_name",
                    "type",
                    "status_badge",
                    "intermediate",
                    "size_human",
                    "check_sum",
                )
            },
        ),
        ("Where", {"fields": ("url", "job", "task", "dataset", "entry")}),
        ("Times", {"fields": ("time_start", "time_end", "created_at", "updated_at")}),
    )
    readonly_fields = ("status_badge", "size_human", "created_at", "updated_at")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("task", "dataset")

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj):
        return state_badge(obj.status)

    @admin.display(description="size", ordering="size")
    def size_human(self, obj):
        return filesizeformat(obj.size)

    @admin.display(description="job", ordering="job_id")
    def job_link(self, obj):
        return admin_link(_related(File, "job"), obj.job_id, f"job {obj.job_id}")

    @admin.display(description="task", ordering="task_id")
    def task_link(self, obj):
        return admin_link(_related(File, "task"), obj.task_id, obj.task if obj.task_id else None)

    @admin.display(description="dataset", ordering="dataset_id")
    def dataset_link(self, obj):
        return admin_link(Dataset, obj.dataset_id, obj.dataset.name if obj.dataset_id else None)


@admin.register(DatasetTransition)
class DatasetTransitionAdmin(TransitionLogAdmin):
    state_choices = DatasetState.choices
