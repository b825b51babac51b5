"""What the gateway's own views ask of their callers: the ``@policy`` mark, and the hook that
authenticates every request of the Flask app before it is rate limited."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flask import current_app, g, request

from app.identity import AUTHENTICATED, Mode, Policy, Principal

F = TypeVar("F", bound=Callable)


def policy(mode: Mode = "required", scopes: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Declare what a view of the gateway's own asks of callers; undecorated views require a credential."""

    def mark(view: F) -> F:
        view.auth_policy = Policy(mode, frozenset(scopes))
        return view

    return mark


def current_principal() -> Principal | None:
    """The authenticated consumer of the current request, or None."""
    return g.get("principal")


def authenticate_request() -> None:
    """before_request: apply the view's policy (undecorated views require a credential)."""
    ctx = g._get_current_object()
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None:
        return  # no such endpoint: the 404 needs no credential
    if request.method == "OPTIONS" and getattr(request.url_rule, "provide_automatic_options", False):
        return  # Flask's own answer, Allow and nothing else: it tells no one's data
    route_policy = getattr(view, "auth_policy", AUTHENTICATED)
    principal = current_app.extensions["auth"].authenticate(request.headers, route_policy)
    ctx.principal = principal
    if principal is not None:
        ctx.consumer_id = principal.consumer_id


