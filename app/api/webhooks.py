"""``/_gateway/webhooks``: a consumer's endpoints, their secrets, test sends, deliveries and redelivery.

A consumer sees only its own endpoints and deliveries; another consumer's id answers 404, as
an unknown one does. The secret is returned when an endpoint is made, on ``.../secret`` and
by ``.../rotate-secret``, never in a listing.
"""
from __future__ import annotations

from typing import Annotated

from flask import Blueprint, g, request, url_for
from pydantic import AfterValidator, Field

from app.api import schemas
from app.api.common import (
    PAGE,
    ConflictProblem,
    Param,
    Reply,
    Schema,
    body,
    found,
    invalid,
    operation,
    page,
    reply,
    status_filter,
    with_status,
)
from app.api.idempotency import HEADER as IDEMPOTENCY_KEY
from app.api.idempotency import idempotent
from app.api.inputs import stored_text
from app.auth.views import current_principal
from app.errors import BadRequest
from app.extensions import db
from app.identity import Principal
from app.models import WebhookDelivery, WebhookEndpoint
from app.models.webhooks import DELIVERY_STATUSES
from app.webhooks import deliveries, endpoints, messages, secrets
from app.webhooks.settings import settings

bp = Blueprint("webhooks", __name__)



def _event_types(values: list[str]) -> list[str]:
    return list(dict.fromkeys(messages.check_filter(value) for value in values))


URL = Annotated[str, Field(min_length=1, max_length=2048)]
EventTypes = Annotated[list[str], Field(max_length=100), AfterValidator(_event_types)]  # [] means every type
Secret = Annotated[str, AfterValidator(secrets.validate)]  # whsec_ + base64 of 24-64 bytes
Description = stored_text(WebhookEndpoint.description, lines=True)


class EndpointCreate(Schema):
    url: URL
    description: Description = ""
    event_types: EventTypes = Field(default_factory=list)
    secret: Secret | None = None  # generated when absent
    disabled: bool = False


class EndpointUpdate(Schema):
    url: URL | None = None
    description: Description | None = None
    event_types: EventTypes | None = None
    disabled: bool | None = None


class SecretRotate(Schema):
    secret: Secret | None = None


EVENT_TYPE = Param("event_type", "query", {"type": "string", "maxLength": 200}, "Only deliveries of messages of this event type")


def event_type_filter() -> str | None:
    """``?event_type=``: one event type, checked as a message's is (400 naming what is wrong);
    the portal's deliveries page reads it too."""
    value = request.args.get("event_type")
    if not value:
        return None
    try:
        return messages.check_type(value)
    except ValueError as exc:
        raise BadRequest(f"event_type: {exc}") from None


def _caller() -> Principal:
    principal = current_principal()
    assert principal is not None  # these views require a credential (the default policy)
    return principal


def _own(endpoint_id: str, secret: bool = False) -> WebhookEndpoint:
    """The caller's endpoint ``endpoint_id``: 404 when unknown or another consumer's."""
    return found(endpoints.owned(_caller().consumer_id, endpoint_id, secret), "webhook endpoint", endpoint_id)


def _refused(exc: endpoints.Refused):
    return invalid(exc.field, str(exc))


ENDPOINT = Reply(schemas.Endpoint, "The endpoint")


@bp.post("/webhooks/endpoints")
@operation(
    "Register a webhook endpoint",
    {201: Reply(schemas.NewEndpoint, "The endpoint with its secret", ("Location", "Idempotent-Replayed?"), location="webhooks.read_endpoint")},
    body=EndpointCreate,
    errors=(409,),
    params=(IDEMPOTENCY_KEY,),
)
@idempotent(reveals_secret=True)
def create_endpoint() -> tuple:
    """Register an endpoint: ``{"url", "description", "event_types", "secret", "disabled"}``;
    201 with the endpoint and its ``secret`` (generated unless given). The URL must pass the
    SSRF guard (https, every resolved address public or allow-listed): 422 names why not."""
    data = body(EndpointCreate)
    try:
        endpoint, plain = endpoints.register(_caller().consumer_id, data.url, data.description, data.event_types, data.secret, data.disabled)
    except endpoints.Refused as exc:
        raise _refused(exc) from exc
    location = url_for("webhooks.read_endpoint", endpoint_id=endpoint.id, _external=True)
    return reply(schemas.NewEndpoint, {**endpoints.endpoint_json(endpoint), "secret": plain}, 201, {"Location": location})


@bp.get("/webhooks/endpoints")
@operation("List webhook endpoints", {200: Reply(schemas.Page[schemas.Endpoint], "One page of the caller's endpoints")}, params=PAGE)
def list_endpoints() -> tuple:
    """``{"data": [endpoint, ...], "next_cursor": ...}``: the caller's endpoints, newest first."""
    rows, next_cursor = page(endpoints.of_consumer(_caller().consumer_id), WebhookEndpoint, db.session)
    return reply(schemas.Page[schemas.Endpoint], {"data": [endpoints.endpoint_json(row) for row in rows], "next_cursor": next_cursor})


@bp.get("/webhooks/endpoints/<id:endpoint_id>")
@operation("Read a webhook endpoint", {200: ENDPOINT}, errors=(404,))
def read_endpoint(endpoint_id: str) -> tuple:
    return reply(schemas.Endpoint, endpoints.endpoint_json(_own(endpoint_id)))


@bp.patch("/webhooks/endpoints/<id:endpoint_id>")
@operation("Change a webhook endpoint", {200: ENDPOINT}, body=EndpointUpdate, errors=(404,))
def update_endpoint(endpoint_id: str) -> tuple:
    """Change ``url``, ``description``, ``event_types`` or ``disabled``. Enabling an endpoint
    clears its failure record; a new URL passes the SSRF guard first (422)."""
    endpoint = _own(endpoint_id)
    data = body(EndpointUpdate)
    try:
        endpoints.change(endpoint, data.url, data.description, data.event_types, data.disabled)
    except endpoints.Refused as exc:
        raise _refused(exc) from exc
    return reply(schemas.Endpoint, endpoints.endpoint_json(endpoint))


@bp.delete("/webhooks/endpoints/<id:endpoint_id>")
@operation("Delete a webhook endpoint", {200: Reply(schemas.Endpoint, "The endpoint as it was; deleted, with its deliveries and their attempts")}, errors=(404,))
def delete_endpoint(endpoint_id: str) -> tuple:
    """Delete the endpoint with its deliveries and their attempts; 200 with the endpoint as it
    was (every DELETE of the API answers the resource as the call left it)."""
    endpoint = _own(endpoint_id)
    last = endpoints.endpoint_json(endpoint)
    endpoints.delete(endpoint)
    return reply(schemas.Endpoint, last)


@bp.get("/webhooks/endpoints/<id:endpoint_id>/secret")
@operation("Read a webhook endpoint's secret", {200: Reply(schemas.EndpointSecret, "The secret")}, errors=(404,))
def read_secret(endpoint_id: str) -> tuple:
    """``{"secret": "whsec_..."}``: the secret deliveries are signed with now."""
    endpoint = _own(endpoint_id, secret=True)
    return reply(schemas.EndpointSecret, {"secret": endpoints.secret_of(endpoint)})


@bp.post("/webhooks/endpoints/<id:endpoint_id>/rotate-secret")
@operation(
    "Rotate a webhook endpoint's secret",
    {200: Reply(schemas.RotatedSecret, "The new secret")},
    body=SecretRotate,
    errors=(404,),
)
def rotate_secret(endpoint_id: str) -> tuple:
    """Make a new secret (or the ``secret`` given) current: ``{"secret", "previous_valid_until"}``.
    For WEBHOOK_SECRET_OVERLAP seconds deliveries carry both signatures, new and old."""
    endpoint = _own(endpoint_id, secret=True)
    data = body(SecretRotate)
    plain = endpoints.rotate_secret(endpoint, data.secret)
    rotating_until = endpoints.endpoint_json(endpoint)["secret_rotating_until"]
    return reply(schemas.RotatedSecret, {"secret": plain, "previous_valid_until": rotating_until})


@bp.post("/webhooks/endpoints/<id:endpoint_id>/test")
@operation("Send a test event", {200: Reply(schemas.Attempt, "The attempt, accepted or not")}, errors=(404, 409))
def test_endpoint(endpoint_id: str) -> tuple:
    """Send a ``webhook.test`` event to the endpoint now and answer with the attempt (200),
    whether the receiver accepted it or not; a test is never retried. 409 with Retry-After
    while the endpoint's WEBHOOK_ENDPOINT_CONCURRENCY attempts are all in flight."""
    endpoint = _own(endpoint_id)
    try:
        row = deliveries.send_test(endpoint, g.get("request_id"))
    except deliveries.EndpointBusy:
        retry = str(int(settings().timeout) + 1)
        raise ConflictProblem(
            f"Endpoint {endpoint_id} already has WEBHOOK_ENDPOINT_CONCURRENCY attempts in flight; try again shortly",
            headers={"Retry-After": retry},
        ) from None
    if row is None:  # the endpoint was deleted while the test was in flight
        raise found(None, "webhook endpoint", endpoint_id)
    return reply(schemas.Attempt, deliveries.attempt_json(row))


@bp.get("/webhooks/endpoints/<id:endpoint_id>/deliveries")
@operation(
    "List an endpoint's deliveries",
    {200: Reply(schemas.Page[schemas.Delivery], "One page of deliveries")},
    errors=(404,),
    params=(*PAGE, status_filter(DELIVERY_STATUSES), EVENT_TYPE),
)
def list_deliveries(endpoint_id: str) -> tuple:
    """``{"data": [delivery, ...], "next_cursor": ...}``, newest first, each with its message
    (id, type) and its latest 20 attempts, oldest first; ``?status=failed,pending`` and
    ``?event_type=order.created`` filter."""
    endpoint = _own(endpoint_id)
    query = with_status(deliveries.of_endpoint(endpoint.id, event_type=event_type_filter()), WebhookDelivery.status, DELIVERY_STATUSES)
    rows, next_cursor = page(query, WebhookDelivery, db.session)
    return reply(schemas.Page[schemas.Delivery], {"data": deliveries.with_attempts(rows), "next_cursor": next_cursor})


def _own_delivery(delivery_id: str) -> WebhookDelivery:
    return found(deliveries.owned(_caller().consumer_id, delivery_id), "webhook delivery", delivery_id)


@bp.get("/webhooks/deliveries/<id:delivery_id>")
@operation("Read a delivery", {200: Reply(schemas.Delivery, "The delivery with its latest attempts")}, errors=(404,))
def read_delivery(delivery_id: str) -> tuple:
    return reply(schemas.Delivery, deliveries.with_attempts([_own_delivery(delivery_id)])[0])


@bp.post("/webhooks/deliveries/<id:delivery_id>/redeliver")
@operation(
    "Redeliver a delivery",
    {202: Reply(schemas.Delivery, "The delivery, due now", ("Location", "Idempotent-Replayed?"), location="webhooks.read_delivery")},
    errors=(404, 409, 422),
    params=(IDEMPOTENCY_KEY,),
)
@idempotent
def redeliver(delivery_id: str) -> tuple:
    """Send the delivery again with the same ``webhook-id`` (202 with the delivery), starting
    its retry schedule over. 409 while an attempt is in flight or the endpoint is disabled."""
    row = _own_delivery(delivery_id)
    try:
        row = deliveries.redeliver_own(row)
    except deliveries.EndpointDisabled as exc:
        raise ConflictProblem(str(exc)) from None
    except deliveries.DeliveryBusy:
        raise ConflictProblem(f"Delivery {delivery_id} is being sent right now; try again when the attempt has ended") from None
    location = url_for("webhooks.read_delivery", delivery_id=row.id, _external=True)
    return reply(schemas.Delivery, deliveries.with_attempts([row])[0], 202, {"Location": location})
