"""Admin of pilots: who is out there, how they are doing; terminate and revoke through services.

Pilots register themselves through the API (``pilot_register``), so pilot pages are view-only.
The token's hash is never shown, searched, filtered or sorted on: the admin says whether the
token is "set" or "revoked".
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, IntegerField, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils.html import format_html

from jobs.models import Job, JobState
from pilots import services
from pilots.models import Pilot, PilotCommand, PilotState, PilotTransition, ReaperState
from wms.admin import (
    ADMIN_SOURCE,
    IdSearchMixin,
    ReadOnlyAdminMixin,
    TransitionInline,
    TransitionLogAdmin,
    WMSAdminMedia,
    admin_changelist_url,
    admin_reason,
    run_service_action,
    state_badge,
)


class TokenFilter(admin.SimpleListFilter):
    title = "token"
    parameter_name = "token"

    def lookups(self, request, model_admin):
        return [("set", "set"), ("revoked", "revoked")]

    def queryset(self, request, queryset):
        if self.value() == "set":
            return queryset.filter(token_hash__isnull=False)
        if self.value() == "revoked":
            return queryset.filter(token_hash__isnull=True)
        return queryset


class PilotTransitionInline(TransitionInline):
    model = PilotTransition


COMMAND_FIELDS = (
    "id",
    "command",
    "job",
    "attempt",
    "reason",
    "created_at",
    "published_at",
    "delivered_at",
    "acked_at",
)


class PilotCommandInline(admin.TabularInline):
    """The commands sent to the pilot and how far each got (published, delivered, acked)."""

    model = PilotCommand
    fields = COMMAND_FIELDS
    readonly_fields = COMMAND_FIELDS
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("-created_at",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Pilot)
class PilotAdmin(ReadOnlyAdminMixin, IdSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "hostname",
        "site",
        "device_type",
        "state_badge",
        "status",
        "running_jobs",
        "slots",
        "cores",
        "gpus",
        "version",
        "last_heartbeat",
        "token_status",
    )
    list_display_links = ("id", "hostname")
    list_filter = ("state", "device_type", "site", TokenFilter, "last_heartbeat", "created_at")
    search_fields = ("hostname", "site", "version", "status")
    date_hierarchy = "created_at"
    ordering = ("-id",)
    actions = ("terminate_pilots", "revoke_tokens")
    inlines = (PilotTransitionInline, PilotCommandInline)
    Media = WMSAdminMedia
    # token_hash is deliberately in none of these.
    fieldsets = (
        (None, {"fields": ("hostname", "site", "device_type", "state_badge", "status")}),
        ("Resources", {"fields": ("cores", "memory_mb", "gpus", "slots", "version")}),
        ("Liveness", {"fields": ("started_at", "last_heartbeat", "metrics", "jobs_link")}),
        ("Token", {"fields": ("token_status", "token_revoked_at")}),
        ("Times", {"fields": ("created_at", "updated_at", "state_changed_at")}),
    )
    readonly_fields = ("state_badge", "token_status", "jobs_link", "running_jobs")

    def get_queryset(self, request):
        running = (
            Job.objects.filter(pilot=OuterRef("pk"), state=JobState.RUNNING)
            .order_by()
            .values("pilot")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                _running_jobs=Coalesce(Subquery(running), Value(0), output_field=IntegerField())
            )
        )

    def lookup_allowed(self, lookup, value, request=None):
        # No filtering by token hash from the URL (?token_hash=...): no guessing oracle.
        if lookup.split("__")[0] == "token_hash":
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj):
        return state_badge(obj.state)

    @admin.display(description="token")
    def token_status(self, obj):
        if obj.token_hash:
            return "set"
        return "revoked" if obj.token_revoked_at else "none"

    @admin.display(description="running jobs", ordering="_running_jobs")
    def running_jobs(self, obj):
        return getattr(obj, "_running_jobs", None)

    @admin.display(description="jobs")
    def jobs_link(self, obj):
        return format_html(
            '<a href="{}">jobs of this pilot</a> · <a href="{}">running now</a>',
            admin_changelist_url(Job, pilot__id__exact=obj.pk),
            admin_changelist_url(Job, pilot__id__exact=obj.pk, state__exact=JobState.RUNNING),
        )

    @admin.action(description="Terminate selected pilots", permissions=["manage"])
    def terminate_pilots(self, request, queryset):
        reason = admin_reason(request, "terminated")
        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "hostname", "state"),
            lambda p: services.pilot_terminate(pilot_id=p.pk, source=ADMIN_SOURCE, reason=reason),
            done="terminated",
            unchanged="already terminated",
            log_message="Terminated (admin action).",
        )

    @admin.action(description="Revoke the token of selected pilots", permissions=["manage"])
    def revoke_tokens(self, request, queryset):
        def revoke(pilot):
            if not pilot.token_hash:
                return False  # already revoked: keep the time it was revoked
            services.pilot_revoke_token(pilot_id=pilot.pk)
            return True

        run_service_action(
            self,
            request,
            queryset.select_related(None).only("pk", "hostname", "token_hash"),
            revoke,
            done="had their token revoked",
            unchanged="had no token left to revoke",
            log_message=f"Token revoked (admin action) by {request.user.get_username()}.",
        )


@admin.register(PilotTransition)
class PilotTransitionAdmin(TransitionLogAdmin):
    state_choices = PilotState.choices


@admin.register(PilotCommand)
class PilotCommandAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Commands to pilots (created by services: a cancel's or a reconciliation's kill_job, a
    terminated pilot's shutdown)."""

    list_display = (
        "created_at",
        "command",
        "pilot",
        "job",
        "attempt",
        "published_at",
        "delivered_at",
        "acked_at",
    )
    list_filter = ("command", "created_at")
    raw_id_fields = ("pilot", "job")
    readonly_fields = COMMAND_FIELDS
    ordering = ("-created_at",)
    list_select_related = ("pilot",)


@admin.register(ReaperState)
class ReaperStateAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The reaper's memory: a hold in force (many pilots silent at once), the last one, the
    grace it gave (docs/lifecycle.md, "The reaper's rule"). Written only by the reaper."""

    list_display = ("name", "last_run_at", "hold_since", "hold_reason", "grace_from")
    readonly_fields = (
        "name",
        "last_run_at",
        "hold_since",
        "hold_reason",
        "hold_silent",
        "hold_live",
        "last_hold_started_at",
        "last_hold_ended_at",
        "grace_from",
        "grace_reason",
        "updated_at",
    )
