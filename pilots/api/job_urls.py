"""URLs of the pilot protocol's job endpoints (docs/pilot-api.md), under /api/v1/.

Jobs are named by uuid here (the job message's ``job_uuid``); the user API's job detail is by
integer id (``jobs/<id>/``), so the two never match the same path.
"""

from django.urls import path

from pilots.api.job_views import JobReportView, JobStartView

urlpatterns = [
    path("jobs/<uuid:job_uuid>/start/", JobStartView.as_view(), name="job-start"),
    path("jobs/<uuid:job_uuid>/report/", JobReportView.as_view(), name="job-report"),
]
