"""What every app's admin shares: state badges, read-only logs, and actions that call services.

The admin is the operators' dashboard. It never writes a model itself: state changes are admin
actions that call a service (``run_service_action``), creations and edits go through a service in
``save_model``, and models without a service are read-only (``ReadOnlyAdminMixin``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.contrib.auth import get_permission_codename
from django.db import models
from django.db.models import Q
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from wms.choices import TransitionSource
from wms.exceptions import WMSError
from wms.models import ApiToken, Switch
from wms.services import api_token_create, api_token_revoke
from wms.statemachine import TransitionResult
from wms.switches import SERVICES, switch_set

ADMIN_SOURCE = TransitionSource.ADMIN.value

# How many failures an action lists one by one before it sums up the rest.
MAX_LISTED_ERRORS = 10


class WMSAdminMedia:
    css = {"all": ("wms/admin.css",)}


def admin_reason(request: HttpRequest, what: str) -> str:
    """The reason written in transition rows: what was done, by which admin user."""
    return f"{what} from the admin by {request.user.get_username()}"


def admin_change_url(obj_or_model: Any, pk: Any = None) -> str | None:
    opts = obj_or_model._meta
    try:
        return reverse(
            f"admin:{opts.app_label}_{opts.model_name}_change",
            args=[obj_or_model.pk if pk is None else pk],
        )
    except NoReverseMatch:
        return None


def admin_changelist_url(model: type[models.Model], **params: Any) -> str:
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    if params:
        url += "?" + urlencode(params)
    return url


def admin_link(model: type[models.Model], pk: Any, text: Any) -> str:
    """A link to the change page of ``model`` ``pk``, or "-" when there is no object."""
    if pk is None:
        return "-"
    url = admin_change_url(model, pk)
    return format_html('<a href="{}">{}</a>', url, text) if url else str(text)


def admin_fk_link(obj: models.Model, field: str, text: Any) -> str:
    """A link to the change page of what ``obj.<field>`` (a foreign key) points at, found
    through the key itself: an app links to another app's admin without importing its
    models (dependencies one way, docs/architecture.md)."""
    fk: Any = obj._meta.get_field(field)
    return admin_link(fk.related_model, getattr(obj, fk.attname), text)


def state_badge(value: str | None) -> str:
    """A coloured pill for a state (or file status); the colours are in wms/admin.css."""
    if not value:
        return "-"
    return format_html('<span class="wms-badge wms-state-{}">{}</span>', value, value)


def copy_into(target: models.Model, source: models.Model) -> None:
    """Make ``target`` (the admin's unsaved form instance) the object a service created."""
    for f in source._meta.concrete_fields:
        setattr(target, f.attname, getattr(source, f.attname))
    target._state.adding = False
    target._state.db = source._state.db


def run_service_action(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    objects: Iterable[models.Model],
    call: Callable[[Any], TransitionResult | bool | int | None],
    *,
    done: str,
    unchanged: str,
    log_message: str,
) -> int:
    """Call ``call(obj)`` (one service call) for every object and report the outcome.

    ``call`` returns a ``TransitionResult`` (won or not), a truthy/falsy value, or ``None``
    (meaning "changed"). A domain error (``WMSError``: an invalid transition, a closed dataset, a
    vanished object) is collected and shown as an admin error message instead of a 500; the
    objects that could be changed stay changed. Every change is also written to the admin's own
    history (``LogEntry``) with the acting user. Returns how many objects changed.
    """
    changed, same = 0, 0
    errors: list[str] = []
    for obj in objects:
        try:
            result = call(obj)
        except WMSError as exc:
            errors.append(f"{obj}: {exc.detail}")
            continue
        won = result.won if isinstance(result, TransitionResult) else result is None or bool(result)
        if won:
            changed += 1
            modeladmin.log_change(request, obj, log_message)
        else:
            same += 1
    opts = modeladmin.model._meta
    name = opts.verbose_name if changed == 1 else opts.verbose_name_plural
    if changed or not (same or errors):
        modeladmin.message_user(request, f"{changed} {name} {done}.", messages.SUCCESS)
    if same:
        name = opts.verbose_name if same == 1 else opts.verbose_name_plural
        modeladmin.message_user(request, f"{same} {name} {unchanged}.", messages.WARNING)
    for line in errors[:MAX_LISTED_ERRORS]:
        modeladmin.message_user(request, line, messages.ERROR)
    if len(errors) > MAX_LISTED_ERRORS:
        modeladmin.message_user(
            request,
            f"... and {len(errors) - MAX_LISTED_ERRORS} more could not be changed.",
            messages.ERROR,
        )
    return changed


class ServiceWriteAdminMixin:
    """Actions need the model's Django ``change`` permission (``permissions=["manage"]``).

    A model admin that makes its change form read-only (no service edits it) still lets users
    with the change permission run the state actions; users with the view permission only see.
    A domain error raised by a service in ``save_model`` (a race the form could not foresee)
    becomes an error message, with the transaction of the request rolled back.
    """

    def has_manage_permission(self, request: HttpRequest) -> bool:
        opts = self.opts  # type: ignore[attr-defined]
        codename = get_permission_codename("change", opts)
        return request.user.has_perm(f"{opts.app_label}.{codename}")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # No service deletes WMS objects: history is kept.
        return False

    # False for a model whose services call the DSM (tasks): its form is saved without the
    # transaction Django's admin puts around it, the services writing in short transactions
    # of their own once the DSM answered (the DSM is never called inside a transaction).
    save_in_transaction = True

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            if not self.save_in_transaction:
                return self._changeform_view_outside_transaction(
                    request, object_id, form_url, extra_context
                )
            return super().changeform_view(  # type: ignore[misc]
                request, object_id, form_url, extra_context
            )
        except WMSError as exc:
            messages.error(request, f"Not saved: {exc.detail}")
            return HttpResponseRedirect(request.get_full_path())

    @csrf_protect_m
    def _changeform_view_outside_transaction(self, request, object_id, form_url, extra_context):
        return self._changeform_view(  # type: ignore[attr-defined]
            request, object_id, form_url, extra_context
        )


class ReadOnlyAdminMixin(ServiceWriteAdminMixin):
    """For models that no service creates or edits from the admin: view and actions only."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class IdSearchMixin:
    """A search term that is a number or a UUID also finds rows by id through the index.

    ``id_search_fields`` are integer lookups (``"pk"``, ``"task_id"``), ``uuid_search_fields``
    UUID lookups; the text ``search_fields`` still apply as usual (OR).
    """

    id_search_fields: tuple[str, ...] = ("pk",)
    uuid_search_fields: tuple[str, ...] = ()

    def get_search_results(self, request, queryset, search_term):
        base = queryset
        qs, may_have_duplicates = super().get_search_results(  # type: ignore[misc]
            request, queryset, search_term
        )
        term = search_term.strip()
        extra = Q()
        if term.isdigit() and len(term) < 19:
            for f in self.id_search_fields:
                extra |= Q(**{f: int(term)})
        if self.uuid_search_fields:
            try:
                value = uuid.UUID(term)
            except ValueError:
                value = None
            if value is not None:
                for f in self.uuid_search_fields:
                    extra |= Q(**{f: value})
        if extra:
            qs = qs | base.filter(extra)
        return qs, may_have_duplicates


def choices_filter(
    field: str, title: str, choices: Iterable[tuple[str, str]]
) -> type[admin.SimpleListFilter]:
    """A list filter with fixed choices (no ``SELECT DISTINCT`` over a big table)."""
    fixed = list(choices)

    class _Filter(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request, model_admin):
            return fixed

        def queryset(self, request, queryset):
            value = self.value()
            return queryset.filter(**{field: value}) if value else queryset

    _Filter.title = title
    _Filter.__name__ = f"{field.title().replace('_', '')}Filter"
    return _Filter


class TransitionSourceFilter(admin.SimpleListFilter):
    """Who asked for a transition; every ``pilot:<id>`` source counts as "pilot"."""

    title = "source"
    parameter_name = "source"

    def lookups(self, request, model_admin):
        return [*TransitionSource.choices, ("pilot", "pilot")]

    def queryset(self, request, queryset):
        value = self.value()
        if not value:
            return queryset
        if value == "pilot":
            return queryset.filter(source__startswith="pilot:")
        return queryset.filter(source=value)


TRANSITION_FIELDS = ("at", "from_state", "to_state", "source", "reason")


class TransitionInline(admin.TabularInline):
    """A read-only history of one object's state changes (no add, no change, no delete)."""

    fields = TRANSITION_FIELDS
    readonly_fields = TRANSITION_FIELDS
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    ordering = ("at", "id")
    verbose_name = "state change"
    verbose_name_plural = "state changes"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class TransitionLogAdmin(ReadOnlyAdminMixin, IdSearchMixin, admin.ModelAdmin):
    """The read-only changelist of one transition log (``TaskTransition``, ``JobTransition``...).

    Transition tables grow with every state change, so: fixed-choice filters (no DISTINCT scan),
    no date hierarchy (it aggregates over the whole table), no full count.
    """

    list_display = ("id", "subject_link", "from_state_badge", "to_state_badge", "at", "source")
    list_display_links = ("id",)
    # The states of the subject's machine (``TaskState.choices``...), for the to-state filter.
    state_choices: Any = ()
    search_fields = ("reason",)
    id_search_fields = ("pk", "subject_id")
    readonly_fields = ("subject_link", *TRANSITION_FIELDS)
    fields = ("subject_link", *TRANSITION_FIELDS)
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # no per-filter COUNT over a big table
    list_per_page = 100
    Media = WMSAdminMedia

    def get_list_filter(self, request):
        to_state = choices_filter("to_state", "to state", self.state_choices)
        return (to_state, TransitionSourceFilter, "at")

    @admin.display(description="object", ordering="subject_id")
    def subject_link(self, obj):
        model = obj._meta.get_field("subject").related_model
        return admin_link(model, obj.subject_id, f"{model._meta.verbose_name} {obj.subject_id}")

    @admin.display(description="from", ordering="from_state")
    def from_state_badge(self, obj):
        return state_badge(obj.from_state)

    @admin.display(description="to", ordering="to_state")
    def to_state_badge(self, obj):
        return state_badge(obj.to_state)


def short(text: str, length: int = 80) -> str:
    return Truncator(text or "").chars(length)


# --- the run-time switches of the background services ------------------------------------------


class SwitchAdminForm(forms.ModelForm):
    name = forms.ChoiceField(choices=[(s, s) for s in SERVICES])

    class Meta:
        model = Switch
        fields = ("name", "enabled")


@admin.register(Switch)
class SwitchAdmin(ServiceWriteAdminMixin, admin.ModelAdmin):
    """Switch the splitter or the executor on/off for every task, through ``switch_set``."""

    form = SwitchAdminForm
    list_display = ("name", "enabled", "updated_at", "updated_by", "last_run_at")
    actions = ("switch_on", "switch_off")

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("name", "enabled")
        return ("name", "enabled", "updated_at", "updated_by", "last_run_at")

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ()
        return ("name", "updated_at", "updated_by", "last_run_at")

    def save_model(self, request, obj, form, change):
        switch = switch_set(
            name=obj.name, enabled=form.cleaned_data["enabled"], by=request.user.get_username()
        )
        copy_into(obj, switch)

    def _switch(self, request, queryset, enabled: bool) -> None:
        word = "on" if enabled else "off"
        by = request.user.get_username()

        def flip(switch: Switch) -> bool:
            if switch.enabled == enabled:
                return False
            switch_set(name=switch.name, enabled=enabled, by=by)
            return True

        run_service_action(
            self,
            request,
            queryset,
            flip,
            done=f"switched {word}",
            unchanged=f"already {word}",
            log_message=f"Switched {word} (admin action).",
        )

    @admin.action(description="Switch on", permissions=["manage"])
    def switch_on(self, request, queryset):
        self._switch(request, queryset, True)

    @admin.action(description="Switch off", permissions=["manage"])
    def switch_off(self, request, queryset):
        self._switch(request, queryset, False)


# --- users' API tokens ------------------------------------------------------------------------


class ApiTokenStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("expired", "expired"), ("revoked", "revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        value = self.value()
        if value == "active":
            return queryset.filter(revoked_at__isnull=True).filter(
                Q(expires_at__isnull=True) | Q(expires_at__gt=now)
            )
        if value == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if value == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ("user", "name", "expires_at")


@admin.register(ApiToken)
class ApiTokenAdmin(ServiceWriteAdminMixin, admin.ModelAdmin):
    """Users' API tokens without their secret: neither the key (never stored) nor its hash is
    shown, searched, filtered or sorted on. Adding one (``api_token_create``) shows its key
    this once, on the page that answers the form; revoking is an action."""

    form = ApiTokenAddForm
    list_display = (
        "name",
        "user",
        "prefix",
        "status",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = (ApiTokenStatusFilter, "created_at", "expires_at")
    search_fields = ("name", "prefix", "user__username")
    raw_id_fields = ("user",)
    list_select_related = ("user",)
    actions = ("revoke_tokens",)
    readonly_fields = (
        "user",
        "name",
        "prefix",
        "status",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    Media = WMSAdminMedia

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("user", "name", "expires_at")
        return self.readonly_fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.readonly_fields

    def has_change_permission(self, request, obj=None):
        return False  # nothing of a token changes but its revocation (the action)

    def lookup_allowed(self, lookup, value, request=None):
        # No filtering by the key's hash from the URL (?key_hash=...): no guessing oracle.
        if lookup.split("__")[0] == "key_hash":
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.display(description="status")
    def status(self, obj):
        if obj.revoked_at:
            return "revoked"
        return "active" if obj.is_active() else "expired"

    def save_model(self, request, obj, form, change):
        token, key = api_token_create(
            user=form.cleaned_data["user"],
            name=form.cleaned_data["name"],
            expires_at=form.cleaned_data.get("expires_at"),
        )
        copy_into(obj, token)
        obj._shown_once_key = key

    def response_add(self, request, obj, post_url_continue=None):
        """The key, this once, on the answer to the form itself (never in a redirect, a
        message stored in a cookie or the session, or a log)."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "token": obj,
            "key": obj._shown_once_key,
            "title": "API token created",
            "changelist_url": admin_changelist_url(ApiToken),
        }
        response = TemplateResponse(request, "admin/wms/apitoken/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke the selected tokens", permissions=["manage"])
    def revoke_tokens(self, request, queryset):
        run_service_action(
            self,
            request,
            queryset,
            lambda token: api_token_revoke(token_id=token.pk),
            done="revoked",
            unchanged="already revoked",
            log_message="Revoked (admin action).",
        )
