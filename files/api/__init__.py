"""API v1 of the files app (mounted under /api/v1/ by config.api_urls)."""
