"""API v1: every app's router, under /api/v1/.

| path | purpose |
|---|---|
| ``tasks/`` | define, list, change, pause, resume and cancel tasks (tasks.api) |
| ``jobs/`` | list and inspect jobs, cancel a job (jobs.api) |
| ``files/``, ``datasets/`` | job files; the DSM catalogue of datasets and their files (files.api) |
| ``pilots/`` | read-only view of the pilots (pilots.api) |
| ``switches/`` | the splitter's and the executor's global on/off switches (wms.switches_api) |

Anything else under /api/v1/ answers 404 with the API's error body.
"""

from django.urls import include, path, re_path

from wms.api import not_found_view

urlpatterns: list = [
    path("", include("tasks.api.urls")),
    path("", include("jobs.api.urls")),
    path("", include("files.api.urls")),
    path("", include("pilots.api.urls")),
    path("", include("wms.switches_api")),
    # Last: unknown paths, the root included. Only paths ending in a slash, so that APPEND_SLASH
    # still redirects "/api/v1/tasks" to "/api/v1/tasks/".
    re_path(r"^(?:.*/)?$", not_found_view),
]
