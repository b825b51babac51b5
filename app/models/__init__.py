"""SQLAlchemy 2.0 models, one module per domain; importing this package registers them all."""
from __future__ import annotations

from app.models.identity import ApiKey, Consumer
from app.models.jobs import Job, JobEvent, JobItem
from app.models.portal import PortalSession
from app.models.requests import IdempotentRequest
from app.models.webhooks import (
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMessage,
)

__all__ = [
    "ApiKey",
    "Consumer",
    "IdempotentRequest",
    "Job",
    "JobEvent",
    "JobItem",
    "PortalSession",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookMessage",
]
