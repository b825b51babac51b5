"""``/_gateway/problems/{slug}``: the page each problem's ``type`` URI names (RFC 9457 section
3.1.1: a type URI should resolve to documentation of the problem), and their index."""
from __future__ import annotations

import inspect
from html import escape

from flask import Blueprint, Response, url_for
from werkzeug.exceptions import NotFound

from app.api.common import Reply, operation
from app.auth.views import policy
from app.errors import ProblemError

bp = Blueprint("problems", __name__)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
</head>
<body>
{body}
</body>
</html>
"""
# A page of text and links: nothing to run, nothing from elsewhere, no framing.
SECURITY = "default-src 'none'; frame-ancestors 'none'"


def catalog() -> dict[str, type[ProblemError]]:
    """Every problem the gateway answers with, by slug: ProblemError and its subclasses (the
    first class found for a slug several classes share)."""
    found: dict[str, type[ProblemError]] = {ProblemError.slug: ProblemError}
    pending = [ProblemError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.setdefault(sub.slug, sub)
            pending.append(sub)
    return dict(sorted(found.items()))


def described(problem: type[ProblemError]) -> str:
    """What causes a problem: the first paragraph of its class's docstring, on one line."""
    text = inspect.cleandoc(problem.__doc__ or "")
    return " ".join(text.split("\n\n", 1)[0].split())


def _page(title: str, body: str) -> Response:
    response = Response(PAGE.format(title=escape(title), body=body), content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = SECURITY
    response.cache_control.public = True
    response.cache_control.max_age = 3600
    return response


@bp.get("/problems")
@policy("none")
@operation("The problems the gateway answers with", {200: Reply(None, "An HTML page listing every problem type, linked to its page", media="text/html", schema={"type": "string"})})
def index() -> Response:
    """Every problem type, with its status and title."""
    items = "\n".join(
        f'<li><a href="{escape(url_for("problems.page", slug=slug))}">{escape(slug)}</a>: {problem.status} {escape(problem.title)}</li>'
        for slug, problem in catalog().items()
    )
    docs = escape(url_for("openapi.docs"))
    return _page("Problem types", f"<h1>Problem types</h1>\n<p>Every error is <code>application/problem+json</code> (RFC 9457); its <code>type</code> is one of these. The API is described at <a href=\"{docs}\">{docs}</a>.</p>\n<ul>\n{items}\n</ul>")


@bp.get("/problems/<slug>")
@policy("none")
@operation(
    "What a problem type means",
    {200: Reply(None, "An HTML page: the problem's status, title and what causes it", media="text/html", schema={"type": "string"})},
    errors=(404,),
)
def page(slug: str) -> Response:
    """The page of the problem ``slug``. Raises NotFound (404 problem) for a slug the gateway never answers with."""
    problem = catalog().get(slug)
    if problem is None:
        raise NotFound(f"No problem type {slug!r}")
    paragraphs = f"<p>{escape(described(problem))}</p>"
    index_url = escape(url_for("problems.index"))
    return _page(
        f"{problem.title}: {slug}",
        f"<h1>{escape(problem.title)}</h1>\n<p>Status <strong>{problem.status}</strong>; <code>type</code> "
        f"<code>{escape(url_for('problems.page', slug=slug))}</code>.</p>\n{paragraphs}\n<p><a href=\"{index_url}\">Every problem type</a></p>",
    )
