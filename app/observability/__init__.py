"""Observability: JSON logs with the request id."""
