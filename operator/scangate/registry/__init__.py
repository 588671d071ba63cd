"""OCI distribution API client (httpx), registry auth, push-event parsers."""
