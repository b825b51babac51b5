"""Portal pages for a consumer's webhook endpoints and their deliveries: the list with each
endpoint's health, creating and editing one, revealing and rotating its secret, a test event,
enabling and disabling; an endpoint's deliveries (filtered by status and event type) with their
attempts, redelivery, and a table that refreshes itself while attempts are pending.

Every action is the service the API's ``/_gateway/webhooks`` calls (``app.webhooks.endpoints``,
``app.webhooks.deliveries``), with the same schemas checking the fields."""
from __future__ import annotations

from flask import g, redirect, request, url_for

from app.api.common import (
    ConflictProblem,
    Unprocessable,
    found,
    page,
    validated,
    with_status,
)
from app.api.webhooks import EndpointCreate, EndpointUpdate, event_type_filter
from app.extensions import db
from app.models import WebhookDelivery, WebhookEndpoint
from app.models.webhooks import DELIVERY_STATUSES, PENDING, SENDING
from app.portal.forms import checked, words
from app.portal.web import page as portal_page
from app.portal.web import render
from app.webhooks import deliveries, endpoints


def _own(session, endpoint_id: str, secret: bool = False) -> WebhookEndpoint:
    return found(endpoints.owned(session.principal.consumer_id, endpoint_id, secret), "webhook endpoint", endpoint_id)


def _listing(session, status: int = 200, **context):
    rows, next_cursor = page(endpoints.of_consumer(session.principal.consumer_id), WebhookEndpoint, db.session)
    listed = [endpoints.endpoint_json(row) for row in rows]
    return render("endpoints.html", session, status, endpoints=listed, next_cursor=next_cursor, form=request.form, **context)


def _endpoint_page(session, endpoint: WebhookEndpoint, status: int = 200, **context):
    return render("endpoint.html", session, status, endpoint=endpoints.endpoint_json(endpoint), form=request.form, **context)


def _fields() -> dict:
    """The endpoint form's fields as the API's schemas take them."""
    return {
        "url": request.form.get("url", "").strip(),
        "description": request.form.get("description", ""),
        "event_types": words(request.form.get("event_types")),
    }


def _form_errors(exc: Exception) -> list[dict]:
    if isinstance(exc, endpoints.Refused):
        return [{"field": exc.field, "message": str(exc)}]
    return exc.extra["errors"]


@portal_page("/endpoints")
def endpoints_page(session):
    """The consumer's endpoints, newest first, each with its health, and the form for a new one."""
    return _listing(session)


@portal_page("/endpoints", methods=("POST",))
def create_endpoint(session):
    """Register an endpoint (URL, description, event types); its page then shows the new
    secret this once. A URL the SSRF guard refuses is named on the form (422)."""
    try:
        data = validated(EndpointCreate, _fields())
        endpoint, secret = endpoints.register(session.principal.consumer_id, data.url, data.description, data.event_types)
    except (Unprocessable, endpoints.Refused) as exc:
        return _listing(session, 422, errors=_form_errors(exc))
    return _endpoint_page(session, endpoint, 201, secret=secret, created=True)


@portal_page("/endpoints/<id:endpoint_id>")
def endpoint_page(session, endpoint_id: str):
    """One endpoint: its health (failing since, disabled and why), the edit form and its actions."""
    return _endpoint_page(session, _own(session, endpoint_id))


@portal_page("/endpoints/<id:endpoint_id>", methods=("POST",))
def edit_endpoint(session, endpoint_id: str):
    """Change the URL, description and event types."""
    endpoint = _own(session, endpoint_id)
    try:
        data = validated(EndpointUpdate, _fields())
        endpoints.change(endpoint, data.url, data.description, data.event_types)
    except (Unprocessable, endpoints.Refused) as exc:
        db.session.rollback()
        return _endpoint_page(session, _own(session, endpoint_id), 422, errors=_form_errors(exc))
    return redirect(url_for("portal.endpoint_page", endpoint_id=endpoint.id), 303)


@portal_page("/endpoints/<id:endpoint_id>/state", methods=("POST",))
def set_endpoint_state(session, endpoint_id: str):
    """Enable the endpoint (its failure record cleared) or disable it (``disabled`` ticked)."""
    endpoint = _own(session, endpoint_id)
    endpoints.change(endpoint, disabled=checked(request.form.get("disabled")))
    return redirect(url_for("portal.endpoint_page", endpoint_id=endpoint.id), 303)


@portal_page("/endpoints/<id:endpoint_id>/secret", methods=("POST",))
def reveal_secret(session, endpoint_id: str):
    """Show the signing secret on this answer only (a POST: never in a URL, history or cache)."""
    endpoint = _own(session, endpoint_id, secret=True)
    return _endpoint_page(session, endpoint, secret=endpoints.secret_of(endpoint))


@portal_page("/endpoints/<id:endpoint_id>/rotate-secret", methods=("POST",))
def rotate_secret(session, endpoint_id: str):
    """A new secret, shown this once; the old one signs too for WEBHOOK_SECRET_OVERLAP seconds."""
    endpoint = _own(session, endpoint_id, secret=True)
    secret = endpoints.rotate_secret(endpoint, None)
    return _endpoint_page(session, endpoint, secret=secret, rotated=True)


@portal_page("/endpoints/<id:endpoint_id>/test", methods=("POST",))
def send_test(session, endpoint_id: str):
    """Send a ``webhook.test`` event now and go to the deliveries, where its attempt shows."""
    endpoint = _own(session, endpoint_id)
    try:
        deliveries.send_test(endpoint, g.get("request_id"))
    except deliveries.EndpointBusy:
        raise ConflictProblem("The endpoint's attempts are all in flight (WEBHOOK_ENDPOINT_CONCURRENCY); try again shortly") from None
    return redirect(url_for("portal.deliveries_page", endpoint_id=endpoint_id), 303)


@portal_page("/endpoints/<id:endpoint_id>/deliveries")
def deliveries_page(session, endpoint_id: str):
    """The endpoint's deliveries, newest first, with their attempts; ``?status=`` and
    ``?event_type=`` filter. htmx asks for the list alone (``HX-Request``) every 2 s while a
    delivery is pending or being sent, every 5 s otherwise (new events show up too)."""
    endpoint = _own(session, endpoint_id)
    query = with_status(deliveries.of_endpoint(endpoint.id, event_type=event_type_filter()), WebhookDelivery.status, DELIVERY_STATUSES)
    rows, next_cursor = page(query, WebhookDelivery, db.session)
    listed = deliveries.with_attempts(rows)
    live = any(row["status"] in (PENDING, SENDING) for row in listed)
    template = "_deliveries.html" if "HX-Request" in request.headers else "deliveries.html"
    return render(
        template, session, endpoint=endpoints.endpoint_json(endpoint), deliveries=listed, next_cursor=next_cursor, live=live,
        statuses=DELIVERY_STATUSES, status=request.args.get("status", ""), event_type=request.args.get("event_type", ""),
    )


@portal_page("/deliveries/<id:delivery_id>/redeliver", methods=("POST",))
def redeliver(session, delivery_id: str):
    """Send the delivery again with the same ``webhook-id``; back to its endpoint's deliveries."""
    row = found(deliveries.owned(session.principal.consumer_id, delivery_id), "webhook delivery", delivery_id)
    try:
        deliveries.redeliver_own(row)
    except deliveries.EndpointDisabled as exc:
        raise ConflictProblem(str(exc)) from None
    except deliveries.DeliveryBusy:
        raise ConflictProblem(f"Delivery {delivery_id} is being sent right now; try again when the attempt has ended") from None
    return redirect(url_for("portal.deliveries_page", endpoint_id=row.endpoint_id), 303)
