"""Admin of jobs and their attempts: read-only views, and cancel through ``jobs.control``.

No service edits a job by hand, so job and attempt pages are view-only; a job's page shows its
attempts, its state changes and its files inline (read-only). The job tables are the biggest of
the WMS: no date hierarchy (it aggregates over the whole table), no full count, no filter that
lists a foreign table; searching a number finds a job by id or by task id through the indexes.
"""

from __future__ import annotations

from django.contrib import admin
from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html

from files.models import File
from jobs.control import job_cancel, job_hold, job_release
from jobs.models import Job, JobAttempt, JobState, JobTransition
from wms.admin import (
    ADMIN_SOURCE,
    IdSearchMixin,
    ReadOnlyAdminMixin,
    TransitionInline,
    TransitionLogAdmin,
    WMSAdminMedia,
    admin_changelist_url,
    admin_fk_link,
    admin_link,
    admin_reason,
    run_service_action,
    short,
    state_badge,
)

ATTEMPT_FIELDS = (
    "number",
    "state_badge",
    "pilot",
    "started_at",
    "ended_at",
    "exit_code",
    "error_code",
    "error",
    "kill_requested_at",
    "kill_acked_at",
)


class JobAttemptInline(admin.TabularInline):
    model = JobAttempt
    fields = ATTEMPT_FIELDS
    readonly_fields = ATTEMPT_FIELDS
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    ordering = ("number",)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("pilot")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="error message")
    def error(self, obj):
        return short(obj.error_message, 120)


FILE_FIELDS = (
    "file_name",
    "type",
    "status_badge",
    "intermediate",
    "size_human",
    "check_sum",
    "dataset",
    "url",
)


class JobFileInline(admin.TabularInline):
    model = File
    fk_name = "job"
    fields = FILE_FIELDS
    readonly_fields = FILE_FIELDS
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    ordering = ("type", "id")
    verbose_name = "file"
    verbose_name_plural = "files (inputs, outputs, log)"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("dataset")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="status")
    def status_badge(self, obj):
        return state_badge(obj.status)

    @admin.display(description="size")
    def size_human(self, obj):
        return filesizeformat(obj.size)


class JobTransitionInline(TransitionInline):
    model = JobTransition


@admin.register(Job)
class JobAdmin(ReadOnlyAdminMixin, IdSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "task_link",
        "state_badge",
        "mode",
        "level",
        "device_type",
        "rank",
        "attempt",
        "pilot_link",
        "time_start",
        "time_end",
        "state_changed_at",
    )
    list_filter = ("state", "device_type", "mode", "level", "state_changed_at", "created_at")
    search_fields = ("task__name",)
    id_search_fields = ("pk", "task_id", "parent_job_id")
    uuid_search_fields = ("uuid",)
    list_select_related = ("task", "pilot")
    raw_id_fields = ("task", "parent_job", "file_in", "file_out", "file_log", "pilot")
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # no per-filter COUNT over a big table
    actions = ("cancel_jobs", "hold_jobs", "release_jobs")
    inlines = (JobAttemptInline, JobTransitionInline, JobFileInline)
    Media = WMSAdminMedia
    fieldsets = (
        (
            None,
            {"fields": ("uuid", "task", "state_badge", "mode", "level", "device_type", "rank")},
        ),
        ("Run", {"fields": ("executable", "args", "attempt", "pilot", "time_start", "time_end")}),
        (
            "Files and merge tree",
            {"fields": ("file_in", "file_out", "file_log", "parent_job", "children")},
        ),
        ("Times", {"fields": ("created_at", "updated_at", "state_changed_at")}),
    )
    readonly_fields = (
        "state_badge",
        "attempt",
        "children",
        "created_at",
        "updated_at",
        "state_changed_at",
    )

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("task", "pilot")

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="task", ordering="task_id")
    def task_link(self, obj):
        return admin_fk_link(obj, "task", obj.task)

    @admin.display(description="pilot", ordering="pilot_id")
    def pilot_link(self, obj):
        return admin_fk_link(obj, "pilot", obj.pilot.hostname if obj.pilot_id else None)

    @admin.display(description="attempt")
    def attempt(self, obj):
        return f"{obj.cur_retry}/{obj.retries}"

    @admin.display(description="merged from")
    def children(self, obj):
        n = obj.children.count()
        if not n:
            return "-"
        return admin_link_list(obj.pk, n)

    @admin.action(description="Cancel selected jobs", permissions=["manage"])
    def cancel_jobs(self, request, queryset):
        reason = admin_reason(request, "cancelled")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "state"),
            lambda j: job_cancel(job_id=j.pk, source=ADMIN_SOURCE, reason=reason),
            done="cancelled",
            unchanged="already cancelled",
            log_message="Cancelled (admin action).",
        )

    @admin.action(description="Hold selected jobs (not dispatched)", permissions=["manage"])
    def hold_jobs(self, request, queryset):
        reason = admin_reason(request, "held")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "state"),
            lambda j: job_hold(job_id=j.pk, source=ADMIN_SOURCE, reason=reason),
            done="held",
            unchanged="already held",
            log_message="Held (admin action).",
        )

    @admin.action(description="Release selected held jobs", permissions=["manage"])
    def release_jobs(self, request, queryset):
        reason = admin_reason(request, "released")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "state"),
            lambda j: job_release(job_id=j.pk, source=ADMIN_SOURCE, reason=reason),
            done="released",
            unchanged="not held (already defined)",
            log_message="Released (admin action).",
        )


def admin_link_list(parent_job_id: int, n: int) -> str:
    return format_html(
        '<a href="{}">{} job{}</a>',
        admin_changelist_url(Job, parent_job__id__exact=parent_job_id),
        n,
        "" if n == 1 else "s",
    )


@admin.register(JobAttempt)
class JobAttemptAdmin(ReadOnlyAdminMixin, IdSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "job_link",
        "number",
        "state_badge",
        "pilot_link",
        "started_at",
        "ended_at",
        "exit_code",
        "error_code",
    )
    list_filter = ("state", "started_at")
    search_fields = ("error_code",)
    id_search_fields = ("pk", "job_id")
    list_select_related = ("pilot",)
    raw_id_fields = ("job", "pilot")
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # no per-filter COUNT over a big table
    Media = WMSAdminMedia
    readonly_fields = ("state_badge",)
    exclude = ("state",)

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="job", ordering="job_id")
    def job_link(self, obj):
        return admin_link(Job, obj.job_id, f"job {obj.job_id}")

    @admin.display(description="pilot", ordering="pilot_id")
    def pilot_link(self, obj):
        return admin_fk_link(obj, "pilot", obj.pilot.hostname if obj.pilot_id else None)


@admin.register(JobTransition)
class JobTransitionAdmin(TransitionLogAdmin):
    state_choices = JobState.choices
