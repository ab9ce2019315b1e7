from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from wms.api import JSONErrorsMixin
from wms.views import healthz

# Under /api/ every error answers {"error", "detail"}; elsewhere (the admin) Django's pages.
# Unknown paths under /api/ are 404s of handler404: no catch-all pattern, so that APPEND_SLASH
# still redirects "/api/v1/tasks" to "/api/v1/tasks/" and only there.
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
]
