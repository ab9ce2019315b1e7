"""API v1: every app's router, under /api/v1/.

| path | purpose |
|---|---|
| ``tasks/`` | define, list, change, pause, resume and cancel tasks (tasks.api) |
| ``jobs/`` | list and inspect jobs, cancel a job (jobs.api) |
| ``files/``, ``datasets/`` | job files; the DSM catalogue of datasets and their files (files.api) |
| ``pilots/`` | read-only view of the pilots (pilots.api) |
| ``pilots/register/``, ``pilots/<id>/…`` | the pilot protocol: register, heartbeat, ... |
| ``jobs/<uuid>/start/``, ``.../report/`` | pilot protocol: start a job, report on it |
| ``switches/`` | the splitter's and the executor's global on/off switches (wms.switches_api) |
| ``tokens/`` | a user's own API tokens: list, create (key shown once), revoke (wms.tokens_api) |

Anything else under /api/ answers 404 with the API's error body (config.urls).
"""

from django.urls import include, path

urlpatterns: list = [
    # The pilot protocol first: "pilots/register/" would otherwise be read as a pilot's id.
    path("", include("pilots.api.pilot_urls")),
    path("", include("pilots.api.job_urls")),
    path("", include("tasks.api.urls")),
    path("", include("jobs.api.urls")),
    path("", include("files.api.urls")),
    path("", include("pilots.api.urls")),
    path("", include("wms.switches_api")),
    path("", include("wms.tokens_api")),
]
