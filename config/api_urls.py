"""API v1: every app's router, under /api/v1/."""


urlpatterns: list = []
