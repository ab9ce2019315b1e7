"""API v1 of the tasks app (mounted under /api/v1/ by config.api_urls)."""
