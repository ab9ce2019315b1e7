"""Admin of tasks: the operators' view of what is asked for and how far each task has got.

The changelist shows every task's jobs by state as a stacked bar, counted for the whole page in
ONE query (``tasks.selectors.tasks_job_counts``). Tasks are created and edited only through
``tasks.create`` (``task_create`` / ``task_update``); state changes are the pause, resume and
cancel actions. The state itself is never a form field.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.utils.html import format_html, format_html_join

import jobs.models
from files.admin import CLOSE_REFUSALS
from files.dsm import get_dsm
from files.models import Dataset, DatasetRole
from jobs.models import Job, JobState
from tasks.create import UPDATABLE_FIELDS, task_create, task_update
from tasks.inputs import resolve_inputs
from tasks.lifecycle import task_cancel, task_pause, task_resume, task_retry_failed
from tasks.models import ACTIVE_TASK_STATES, Task, TaskInput, TaskState, TaskTransition
from tasks.selectors import task_job_counts, tasks_job_counts
from wms.admin import (
    ADMIN_SOURCE,
    IdSearchMixin,
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
from wms.exceptions import InvalidTransition, ValidationFailed

# The order of the bar's segments: done first, then what is still moving, then the bad ends.
PROGRESS_ORDER = (
    JobState.FINISHED,
    JobState.RUNNING,
    JobState.QUEUED,
    JobState.DEFINED,
    JobState.HELD,
    JobState.FAILED,
    JobState.CANCELLED,
)
FINAL_JOB_STATES = set(jobs.models.FINAL_JOB_STATES)

# What task_create takes (the add form) and what task_update may change (the change form).
CREATE_FIELDS: tuple[str, ...] = (
    "data_in_follow",
    "name",
    "executable",
    "args",
    "device_type",
    "mode",
    "rank",
    "files_per_job",
    "max_retries",
    "max_failed_fraction",
    "storage_url",
    "data_out_url",
    "splitter_enabled",
    "executor_enabled",
    "merge_group_size",
    "merge_executable",
    "merge_args",
    "merge_max_level",
    "merge_on_child_failure",
)
UPDATE_FIELDS = UPDATABLE_FIELDS


def job_progress_bar(task_id: int, counts: dict[str, int]) -> str:
    """A stacked bar, one segment per job state (count in its title), linked to the jobs."""
    total = sum(counts.values())
    if not total:
        return format_html('<span class="wms-progress-empty">{}</span>', "no jobs")
    summary = ", ".join(f"{s}: {counts.get(s, 0)}" for s in PROGRESS_ORDER)
    segments = format_html_join(
        "",
        '<span class="wms-seg wms-state-{}" style="width:{}%" title="{}: {}"></span>',
        (
            (state, f"{100 * counts[state] / total:.3f}", state, counts[state])
            for state in PROGRESS_ORDER
            if counts.get(state)
        ),
    )
    done = sum(counts.get(s, 0) for s in FINAL_JOB_STATES)
    return format_html(
        '<a class="wms-progress" href="{}" title="{}">{}</a>'
        '<span class="wms-progress-label">{}/{} done</span>',
        admin_changelist_url(Job, task__id__exact=task_id),
        summary,
        segments,
        done,
        total,
    )


class TaskChangeList(ChangeList):
    """Counts the jobs of every task on the page in ONE query, after the page is fetched."""

    def get_results(self, request):
        super().get_results(request)
        tasks = list(self.result_list)  # evaluates the page once; the template reuses it
        counts = tasks_job_counts(task_ids=[t.pk for t in tasks])
        for task in tasks:
            task._admin_job_counts = counts[task.pk]


MERGE_FIELDS = (
    "merge_group_size",
    "merge_executable",
    "merge_args",
    "merge_max_level",
    "merge_on_child_failure",
)


class TaskAdminForm(forms.ModelForm):
    """Model validation as usual; the merge settings may be left empty: they take the model's
    defaults (no merge)."""

    class Meta:
        model = Task
        fields = CREATE_FIELDS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in MERGE_FIELDS:
            if name in self.fields:
                self.fields[name].required = False

    def clean(self):
        cleaned = super().clean()
        for name in MERGE_FIELDS:
            if name in self.fields and cleaned.get(name) in (None, ""):
                cleaned[name] = Task._meta.get_field(name).default
        return cleaned


class TaskAddForm(TaskAdminForm):
    """The add form: the input datasets too, as ``data_in_uid`` and, optionally, more uids
    (one a line) read after it, OR a name pattern. Resolved through the DSM (reads only) with
    the service's own rules, so a bad input is a form error, never a 500."""

    more_inputs = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 40}),
        label="More input datasets",
        help_text="Further dataset uids, one a line, read after the first, in this order.",
    )

    class Meta(TaskAdminForm.Meta):
        fields = (*CREATE_FIELDS, "data_in_uid", "data_in_selection")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("data_in_uid", "data_in_selection"):
            self.fields[name].required = False
        self.input_uids: list = []

    def clean(self):
        cleaned = super().clean()
        if not self.errors:
            self._clean_inputs(cleaned)
        return cleaned

    def _clean_inputs(self, cleaned) -> None:
        first = cleaned.get("data_in_uid")
        more = [line.strip() for line in cleaned.get("more_inputs", "").splitlines()]
        more = [line for line in more if line]
        if more and not first:
            self.add_error("more_inputs", "Give the first input dataset (data in uid) too.")
            return
        uids = [first, *more] if first else None
        try:
            with get_dsm() as dsm:
                datasets = resolve_inputs(
                    dsm,
                    data_in_uids=uids,
                    data_in_selection=cleaned.get("data_in_selection") or "",
                )
        except ValidationFailed as exc:
            for key, messages in exc.detail.items():
                field, _, index = key.partition("[")
                if field == "data_in_uids":
                    line = int(index.rstrip("]") or 0)
                    if line == 0:
                        field = "data_in_uid"
                    else:
                        field = "more_inputs"
                        messages = [f"line {line}: {m}" for m in messages]
                self.add_error(field if field in self.fields else None, list(messages))
            return
        self.input_uids = [ds.uid for ds in datasets]


class TaskInputInline(admin.TabularInline):
    """The task's input datasets, in order, with how far the splitter got (read-only)."""

    model = TaskInput
    fields = ("position", "dataset_link", "split_cursor", "split_done_at")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("position",)
    verbose_name = "input dataset"
    verbose_name_plural = "input datasets (read in this order)"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="dataset")
    def dataset_link(self, obj):
        # The admin makes its inline instances per request: the datasets of the task's inputs
        # are read ONCE per page, not once per row.
        cache = self.__dict__.setdefault("_datasets_of_task", {})
        datasets = cache.get(obj.task_id)
        if datasets is None:
            uids = TaskInput.objects.filter(task_id=obj.task_id).values("dataset_uid")
            datasets = cache[obj.task_id] = {
                ds.uid: ds
                for ds in Dataset.objects.filter(uid__in=uids).only("pk", "uid", "name", "state")
            }
        ds = datasets.get(obj.dataset_uid)
        if ds is None:
            return f"{obj.dataset_uid} (not in the DSM catalogue)"
        return format_html("{} ({})", admin_link(Dataset, ds.pk, ds.name), ds.state)


class TaskTransitionInline(TransitionInline):
    model = TaskTransition


@admin.register(Task)
class TaskAdmin(ServiceWriteAdminMixin, IdSearchMixin, admin.ModelAdmin):
    form = TaskAdminForm
    list_display = (
        "id",
        "name",
        "owner",
        "state_badge",
        "job_progress",
        "device_type",
        "mode",
        "rank",
        "created_at",
        "state_changed_at",
    )
    list_display_links = ("id", "name")
    list_filter = ("state", "device_type", "mode", "splitter_enabled", "executor_enabled")
    search_fields = ("name", "executable", "owner__username")
    uuid_search_fields = ("data_in_uid", "data_out_uid")
    list_select_related = ("owner",)
    date_hierarchy = "created_at"
    ordering = ("-id",)
    actions = ("pause_tasks", "resume_tasks", "cancel_tasks", "retry_failed_jobs")
    inlines = (TaskInputInline, TaskTransitionInline)
    Media = WMSAdminMedia

    add_fieldsets = (
        (None, {"fields": ("name", "executable", "args")}),
        (
            "Input datasets",
            {
                "description": "Either a first dataset uid (and more, one a line), or a name "
                "pattern (* any run of characters, ? one) selecting the datasets by name.",
                "fields": ("data_in_uid", "more_inputs", "data_in_selection", "data_in_follow"),
            },
        ),
        (
            "Scheduling",
            {
                "fields": (
                    "device_type",
                    "mode",
                    "rank",
                    "files_per_job",
                    "max_retries",
                    "max_failed_fraction",
                )
            },
        ),
        ("Output", {"fields": ("storage_url", "data_out_url")}),
        ("Switches", {"fields": ("splitter_enabled", "executor_enabled")}),
        (
            "Merge",
            {
                "fields": (
                    "merge_group_size",
                    "merge_executable",
                    "merge_args",
                    "merge_max_level",
                    "merge_on_child_failure",
                )
            },
        ),
    )
    change_fieldsets = (
        (None, {"fields": ("name", "owner", "state_badge", "job_progress_detail")}),
        ("What runs", {"fields": ("executable", "args", "mode", "files_per_job")}),
        (
            "Scheduling",
            {
                "fields": (
                    "device_type",
                    "rank",
                    "max_retries",
                    "max_failed_fraction",
                    "splitter_enabled",
                    "executor_enabled",
                )
            },
        ),
        (
            "Data",
            {
                "fields": (
                    "data_in_uid",
                    "input_dataset",
                    "data_in_selection",
                    "data_in_follow",
                    "data_out_uid",
                    "output_dataset",
                    "storage_url",
                    "data_out_url",
                    "output_closed_at",
                )
            },
        ),
        (
            "Merge",
            {
                "fields": (
                    "merge_group_size",
                    "merge_executable",
                    "merge_args",
                    "merge_max_level",
                    "merge_on_child_failure",
                    "merge_groups_failed",
                )
            },
        ),
        ("End", {"fields": ("jobs_finished", "jobs_failed", "jobs_cancelled")}),
        ("Times", {"fields": ("created_at", "updated_at", "state_changed_at")}),
    )

    def get_changelist(self, request, **kwargs):
        return TaskChangeList

    def changelist_view(self, request, extra_context=None):
        extra_context = {
            "wms_job_states": [str(s) for s in PROGRESS_ORDER],
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context)

    def get_fieldsets(self, request, obj=None):
        return self.add_fieldsets if obj is None else self.change_fieldsets

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = TaskAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        shown = [f for _, opts in self.change_fieldsets for f in opts["fields"]]
        return tuple(f for f in shown if f not in UPDATE_FIELDS)

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else ()

    # --- writes: only through tasks.create -----------------------------------------------

    save_in_transaction = False  # task_create / task_update call the DSM (wms.admin)

    def save_model(self, request, obj, form, change):
        if not change:
            selection = form.cleaned_data.get("data_in_selection") or ""
            task = task_create(
                owner=request.user,
                data_in_uids=None if selection else form.input_uids,
                data_in_selection=selection,
                **{f: form.cleaned_data[f] for f in CREATE_FIELDS},
            )
            copy_into(obj, task)
            return
        changes = {f: form.cleaned_data[f] for f in form.changed_data if f in UPDATE_FIELDS}
        if changes:
            copy_into(obj, task_update(task_id=obj.pk, **changes))

    # --- columns ------------------------------------------------------------------------

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="jobs by state")
    def job_progress(self, obj):
        counts = getattr(obj, "_admin_job_counts", None)
        if counts is None:  # not on a changelist page: count for this task alone
            counts = task_job_counts(task_id=obj.pk)
        return job_progress_bar(obj.pk, counts)

    @admin.display(description="jobs")
    def job_progress_detail(self, obj):
        counts = task_job_counts(task_id=obj.pk)
        total = sum(counts.values())
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td class="wms-count"><a href="{}">{}</a></td></tr>',
            (
                (
                    state_badge(state),
                    admin_changelist_url(Job, task__id__exact=obj.pk, state__exact=state),
                    counts[state],
                )
                for state in PROGRESS_ORDER
            ),
        )
        return format_html(
            '{}<table class="wms-counts"><tbody>{}<tr><th>total</th>'
            '<th class="wms-count"><a href="{}">{}</a></th></tr></tbody></table>',
            job_progress_bar(obj.pk, counts),
            rows,
            admin_changelist_url(Job, task__id__exact=obj.pk),
            total,
        )

    @admin.display(description="first input dataset")
    def input_dataset(self, obj):
        ds = Dataset.objects.filter(uid=obj.data_in_uid).only("pk", "name").first()
        return admin_link(Dataset, ds.pk, ds.name) if ds else "not in the DSM catalogue"

    @admin.display(description="output dataset")
    def output_dataset(self, obj):
        if obj.data_out_uid is None:
            return "-"
        ds = Dataset.objects.filter(uid=obj.data_out_uid).only("pk", "name").first()
        return admin_link(Dataset, ds.pk, ds.name) if ds else "not in the DSM catalogue"

    # --- actions: state changes through tasks.lifecycle ---------------------------------

    @admin.action(description="Pause selected tasks", permissions=["manage"])
    def pause_tasks(self, request, queryset):
        reason = admin_reason(request, "paused")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "name", "state"),
            lambda t: task_pause(task_id=t.pk, source=ADMIN_SOURCE, reason=reason),
            done="paused",
            unchanged="already paused",
            log_message="Paused (admin action).",
        )

    @admin.action(description="Resume selected paused tasks", permissions=["manage"])
    def resume_tasks(self, request, queryset):
        reason = admin_reason(request, "resumed")

        def resume(task):
            # "Resume" is paused -> running; a defined task is started by the splitter, not here.
            # A paused task can only move on to running or cancelled, so the check cannot race
            # into a wrong start: the service still decides (and refuses cancelled).
            if task.state == TaskState.DEFINED:
                raise InvalidTransition(
                    entity="task",
                    pk=task.pk,
                    current=task.state,
                    target=TaskState.RUNNING,
                    detail=f"task {task.pk} is not paused (it is defined); nothing to resume.",
                )
            return task_resume(task_id=task.pk, source=ADMIN_SOURCE, reason=reason)

        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "name", "state"),
            resume,
            done="resumed",
            unchanged="already running",
            log_message="Resumed (admin action).",
        )

    @admin.action(description="Cancel selected tasks (and their jobs)", permissions=["manage"])
    def cancel_tasks(self, request, queryset):
        reason = admin_reason(request, "cancelled")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "name", "state"),
            lambda t: task_cancel(task_id=t.pk, source=ADMIN_SOURCE, reason=reason),
            done="cancelled",
            unchanged="already cancelled",
            log_message="Cancelled (admin action).",
        )

    @admin.action(description="Retry the failed jobs of selected tasks", permissions=["manage"])
    def retry_failed_jobs(self, request, queryset):
        reason = admin_reason(request, "failed jobs retried")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "name", "state"),
            lambda t: task_retry_failed(task_id=t.pk, source=ADMIN_SOURCE, reason=reason),
            done="had their failed jobs retried",
            unchanged="had no failed job",
            log_message="Failed jobs retried (admin action).",
        )


@admin.register(TaskTransition)
class TaskTransitionAdmin(TransitionLogAdmin):
    state_choices = TaskState.choices


def _output_of_active_task(ds: Dataset) -> str | None:
    """The dataset admin's close of the output dataset of a task that may still run jobs is
    refused (its jobs' outputs and logs still go there; the WMS closes it when the task ends:
    cancel the task instead). Once the task ended, an operator may close it by hand (e.g. when
    a pilot never acknowledged a kill and the finalizer still waits)."""
    if ds.role != DatasetRole.OUTPUT:
        return None
    active = (
        Task.objects.filter(data_out_uid=ds.uid, state__in=ACTIVE_TASK_STATES)
        .values_list("pk", flat=True)
        .first()
    )
    if active is None:
        return None
    return (
        f"{ds.name} is the output dataset of task {active}, which may still run jobs: "
        "the WMS closes it when the task ends (cancel the task to end it now)."
    )


CLOSE_REFUSALS.append(_output_of_active_task)
