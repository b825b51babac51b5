"""What every portal page shares: the blueprint, the ``@page`` declaration (session, CSRF check,
admin scope), the session cookie, the security headers, and the error page.

Pages are read without JavaScript; htmx (served from ``static/``) only refreshes parts of them.
A form posts with the session's CSRF token; the sign-in form, before there is a session, with a
token in a cookie of its own (double submit, the cookie ``__Host-`` prefixed on HTTPS so that
no sibling host can set it). A POST from another origin is refused whatever it carries.
"""
from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    redirect,
    render_template,
    request,
    send_from_directory,
    url_for,
)
from werkzeug.exceptions import HTTPException

from app.errors import ProblemError
from app.identity import PUBLIC
from app.portal import sessions
from app.portal.sessions import SignedIn

bp = Blueprint("portal", __name__, template_folder="templates")
STATIC = Path(__file__).parent / "static"
STATIC_MAX_AGE = 86400  # seconds a browser keeps the script and the stylesheet (ETag to revalidate)

# htmx 2.0.11 (npm package htmx.org, 0BSD), dist/htmx.min.js as published: README, "The portal".
HTMX_VERSION = "2.0.11"

# Pages run only the gateway's own files: no inline script or style, nothing from elsewhere,
# never inside a frame (CSP Level 3; frame-ancestors supersedes X-Frame-Options, sent too).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # pages show keys and secrets: never kept by a cache
}


class Refused(ProblemError):
    """403: a portal form came without its CSRF token, with another one, or from another origin."""

    status, title, slug = 403, "Forbidden", "form-refused"


class SignedOut(ProblemError):
    """401: the portal page needs a signed-in session, and this browser has none (signed out, expired, or its key revoked)."""

    status, title, slug = 401, "Unauthorized", "signed-out"


class NotOperator(ProblemError):
    """403: the portal's operator pages need a credential with the admin scope."""

    status, title, slug = 403, "Forbidden", "not-operator"


def _cookie_name(base: str) -> str:
    # The __Host- prefix (RFC 6265bis section 4.1.3.2): Secure, Path=/ and no Domain, so
    # neither plain HTTP nor a sibling host can set it.
    return f"__Host-{base}" if request.is_secure else base


def session_cookie() -> str:
    return _cookie_name("frontdoor-portal")


def form_cookie() -> str:
    return _cookie_name("frontdoor-portal-form")


def set_cookie(response: Response, name: str, value: str, max_age: int, same_site: str = "Lax") -> None:
    """HttpOnly, ``same_site``, Secure on HTTPS (as seen through TRUSTED_PROXY_HOPS)."""
    path = "/" if request.is_secure else url_for("portal.overview")
    response.set_cookie(name, value, max_age=max_age, path=path, secure=request.is_secure, httponly=True, samesite=same_site)


def clear_cookie(response: Response, name: str) -> None:
    path = "/" if request.is_secure else url_for("portal.overview")
    response.delete_cookie(name, path=path, secure=request.is_secure, httponly=True, samesite="Lax")


def current_session() -> SignedIn | None:
    return sessions.signed_in(request.cookies.get(session_cookie()))


def _same_origin() -> bool:
    """Whether a POST comes from the portal's own origin, by ``Sec-Fetch-Site`` or ``Origin``
    (Fetch Metadata; RFC 6454); a client that sends neither is judged by its token alone."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return (parts.scheme, parts.netloc) == (request.scheme, request.host)


def check_form(expected: str | None) -> None:
    """Raise Refused unless the POST is same-origin and carries ``expected`` as ``csrf_token``."""
    if not _same_origin():
        raise Refused("The form was posted from another site")
    if expected is None or not sessions.same_token(request.form.get("csrf_token"), expected):
        raise Refused("The form's CSRF token is missing or not this session's; reload the page and send it again")


def page(rule: str, methods: tuple[str, ...] = ("GET",), signed_in: bool = True, admin: bool = False) -> Callable:
    """Register a portal page at ``rule``. With ``signed_in`` the view gets the session as its
    first argument; without one a GET is sent to the sign-in page and anything else is refused
    (SignedOut, 401). A POST must pass ``check_form``; ``admin`` pages need the admin scope
    (NotOperator, 403)."""

    def register(view: Callable) -> Callable:
        @functools.wraps(view)
        def handle(*args, **kwargs):
            if not signed_in:
                return view(*args, **kwargs)
            session = current_session()
            if session is None:
                if request.method == "GET" and "HX-Request" not in request.headers:
                    return redirect(url_for("portal.sign_in", next=request.full_path.rstrip("?")), 303)
                raise SignedOut("Sign in to the portal first: this browser's session has ended")
            if request.method == "POST":
                check_form(session.csrf_token)
            if admin and not session.principal.is_admin:
                raise NotOperator("The operator pages need a credential with the admin scope")
            return view(session, *args, **kwargs)

        # The gateway's own authentication reads headers; the portal signs in with its cookie.
        handle.auth_policy = PUBLIC
        handle.carries_secrets = True  # never compressed: a page with a token is a BREACH target
        bp.add_url_rule(rule, view_func=handle, methods=list(methods))
        return handle

    return register


def render(template: str, session: SignedIn | None, code: int = 200, **context) -> tuple[str, int]:
    """``template`` rendered with the session (``viewer``) and the htmx version, and the
    answer's status ``code``."""
    return render_template(f"portal/{template}", viewer=session, htmx_version=HTMX_VERSION, **context), code


def local_next(value: str | None) -> str:
    """Where to go after signing in: a path under the portal, else the overview (no open
    redirect to another site)."""
    home = url_for("portal.overview")
    if value and value.startswith(home) and not value.startswith("//") and "\\" not in value:
        return value
    return home


def new_form_token() -> str:
    return secrets.token_urlsafe(sessions.TOKEN_BYTES)


@page("/static/<path:filename>", signed_in=False)
def asset(filename: str) -> Response:
    """The portal's script (htmx, portal.js) and stylesheet, with ETag and a day's max-age."""
    return send_from_directory(STATIC, filename, max_age=STATIC_MAX_AGE)


@bp.after_request
def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        if name == "Cache-Control" and request.endpoint == "portal.asset":
            continue  # the script and the stylesheet are cached (ETag, max-age)
        response.headers.setdefault(name, value)
    return response


@bp.errorhandler(ProblemError)
def _problem(error: ProblemError) -> tuple[str, int, dict]:
    """A refused request is a page, with the problem's title, status and detail."""
    headers = {name: value for name, value in error.headers.items() if name.lower() == "retry-after"}
    body, status = render("error.html", _viewer_or_none(), error.status, title=error.title, detail=error.detail)
    return body, status, headers


@bp.errorhandler(HTTPException)
def _http(error: HTTPException) -> tuple[str, int]:
    return render("error.html", _viewer_or_none(), error.code or 500, title=error.name, detail=error.description)


def _viewer_or_none() -> SignedIn | None:
    try:
        return current_session()
    except Exception:
        current_app.logger.debug("no session for the error page", exc_info=True)
        return None
