"""The HTTP API: datasets, jobs, their events, metrics and artifacts (FastAPI, JSON, under /v1)."""
