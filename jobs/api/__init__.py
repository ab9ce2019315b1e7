"""API v1 of the jobs app (mounted under /api/v1/ by config.api_urls)."""
