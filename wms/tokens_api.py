"""API of a user's own API tokens: ``/api/v1/tokens/`` (list, create), ``/api/v1/tokens/{id}/``
(show) and ``/api/v1/tokens/{id}/revoke/``.

A user sees and revokes their own tokens only (another user's token is 404, as one that does
not exist); no answer ever holds a key but the one that creates it, nor any key's hash. A token
made with a token cannot outlive it: a stolen token cannot mint itself a longer life.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.urls import path
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from wms.api import PageNumberPagination, StrictFieldsMixin, error_responses
from wms.exceptions import NotFound, ValidationFailed
from wms.models import ApiToken
from wms.services import api_token_create, api_token_revoke

MAX_DAYS = 3650


class ApiTokenSerializer(serializers.ModelSerializer):
    """A token as its owner sees it: no secret (``prefix`` is the key's first characters)."""

    active = serializers.SerializerMethodField()

    class Meta:
        model = ApiToken
        fields: tuple[str, ...] = (
            "id",
            "name",
            "prefix",
            "active",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        )
        read_only_fields: tuple[str, ...] = fields

    def get_active(self, obj: ApiToken) -> bool:
        return obj.is_active()


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    """The answer to a creation: the token and its ``key``, shown this once."""

    key = serializers.CharField(
        read_only=True,
        help_text="The secret: `Authorization: Token <key>`. Shown this once; only its hash "
        "is kept.",
    )

    class Meta(ApiTokenSerializer.Meta):
        fields = (*ApiTokenSerializer.Meta.fields, "key")
        read_only_fields = fields


class ApiTokenCreateSerializer(StrictFieldsMixin, serializers.Serializer):
    name = serializers.CharField(max_length=100, help_text="What the token is for.")
    expires_in_days = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_DAYS,
        help_text="Days until it expires; 0: never. Default: the site's "
        "(WMS_API_TOKEN_DEFAULT_DAYS). A token made with an expiring token expires no later.",
    )


def _expiry(request, days: int | None):
    """When the new token expires: as asked (or the site's default), never after the token
    the request itself came with."""
    now = timezone.now()
    if days is None:
        days = settings.WMS_API_TOKEN_DEFAULT_DAYS
    expires_at = now + timedelta(days=days) if days else None
    creator = request.auth if isinstance(request.auth, ApiToken) else None
    limit = creator.expires_at if creator is not None else None
    if limit is not None and (expires_at is None or expires_at > limit):
        if "expires_in_days" in request.data:
            raise ValidationFailed(
                {
                    "expires_in_days": [
                        "A token made with a token cannot outlive it: this one expires "
                        f"{limit.isoformat()}."
                    ]
                }
            )
        expires_at = limit
    return expires_at


@extend_schema(tags=["tokens"])
class ApiTokenListView(generics.ListAPIView):
    serializer_class = ApiTokenSerializer
    pagination_class = PageNumberPagination
    filter_backends: list = []

    def get_queryset(self):
        return ApiToken.objects.filter(user=self.request.user).order_by("-created_at", "-id")

    @extend_schema(
        summary="List your API tokens",
        description="Your own tokens, newest first, without any secret.",
        responses={200: ApiTokenSerializer(many=True), **error_responses()},
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Create an API token",
        description="The answer holds the token's key, shown this once: only its hash is kept.",
        request=ApiTokenCreateSerializer,
        responses={201: ApiTokenCreatedSerializer, **error_responses(400)},
    )
    def post(self, request):
        body = ApiTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        token, key = api_token_create(
            user=request.user,
            name=body.validated_data["name"],
            expires_at=_expiry(request, body.validated_data.get("expires_in_days")),
        )
        data = ApiTokenCreatedSerializer(token).data
        data["key"] = key
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


def _own_token(request, token_id: int) -> ApiToken:
    token = ApiToken.objects.filter(pk=token_id, user=request.user).first()
    if token is None:
        raise NotFound(f"No API token {token_id}.")
    return token


@extend_schema(tags=["tokens"])
class ApiTokenDetailView(APIView):
    @extend_schema(
        summary="Show one of your API tokens",
        responses={200: ApiTokenSerializer, **error_responses(404)},
    )
    def get(self, request, token_id: int):
        return Response(ApiTokenSerializer(_own_token(request, token_id)).data)


@extend_schema(tags=["tokens"])
class ApiTokenRevokeView(APIView):
    @extend_schema(
        summary="Revoke one of your API tokens",
        description="Its next request is refused (401). Revoking a revoked token is a no-op.",
        request=None,
        responses={200: ApiTokenSerializer, **error_responses(404)},
    )
    def post(self, request, token_id: int):
        api_token_revoke(token_id=token_id, user=request.user)
        return Response(ApiTokenSerializer(_own_token(request, token_id)).data)


urlpatterns = [
    path("tokens/", ApiTokenListView.as_view(), name="apitoken-list"),
    path("tokens/<int:token_id>/", ApiTokenDetailView.as_view(), name="apitoken-detail"),
    path("tokens/<int:token_id>/revoke/", ApiTokenRevokeView.as_view(), name="apitoken-revoke"),
]
