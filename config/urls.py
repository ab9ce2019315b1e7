from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from wms.api import JSONErrorsMixin, not_found_view
from wms.views import healthz

# Under /api/ every error answers {"error", "detail"}; elsewhere (the admin) Django's pages.
handler400 = "wms.api.bad_request"
handler403 = "wms.api.permission_denied"
handler404 = "wms.api.page_not_found"
handler500 = "wms.api.server_error"


class SchemaView(JSONErrorsMixin, SpectacularAPIView):
    pass


class SwaggerView(JSONErrorsMixin, SpectacularSwaggerView):
    pass


urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/v1/", include("config.api_urls")),
    # Last: unknown paths under /api/ answer the error body in every mode (DEBUG's own 404
    # page would not). Only paths ending in a slash, so that APPEND_SLASH still redirects
    # "/api/v1/tasks" to "/api/v1/tasks/"; other paths get handler404's body.
    re_path(r"^api/(?:.*/)?$", not_found_view),
]
