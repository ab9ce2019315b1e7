from rest_framework.routers import SimpleRouter

from files.api.views import DatasetViewSet, FileViewSet

router = SimpleRouter()
router.register("files", FileViewSet, basename="file")

# Datasets are found by uid: a path converter types it (a non-uuid path is a 404).
dataset_router = SimpleRouter(use_regex_path=False)
dataset_router.register("datasets", DatasetViewSet, basename="dataset")

urlpatterns = router.urls + dataset_router.urls
