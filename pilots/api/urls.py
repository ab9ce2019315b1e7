from rest_framework.routers import SimpleRouter

from pilots.api.views import PilotViewSet

router = SimpleRouter()
router.register("pilots", PilotViewSet, basename="pilot")

urlpatterns = router.urls
