"""API v1 of the pilots app (mounted under /api/v1/ by config.api_urls)."""
