"""Route match: longest path prefix on segment boundaries, ``{param}`` segments, method filter."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.errors import ProblemError
from app.gateway.routefile import METHODS, Route
from app.gateway.types import Handler

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")


def has_dot_segment(path: str) -> bool:
    """True when the decoded ``path`` has a ``.`` or ``..`` segment.

    "/public/../admin" matches the route "/public" here but means "/admin" to an upstream that
    normalises paths (RFC 3986 section 5.2.4): such paths are refused, never routed.
    """
    return _DOT_SEGMENT.search(path) is not None


# What makes a path mean one thing to the gateway's router and maybe another to an upstream
# that normalises it (Envoy rejects the same by default): an encoded '/' or '\\', a '\\', NUL,
# a ';' path parameter, a segment ending in '.' or in white space.
_AMBIGUOUS = (
    (re.compile(r"%2f", re.IGNORECASE), "an encoded '/' (%2F)"),
    (re.compile(r"%5c|\\", re.IGNORECASE), "a backslash"),
    (re.compile(r"%00|\x00"), "a NUL byte"),
    (re.compile(r";"), "a ';' path parameter"),
    (re.compile(r"(?:\.|%2e)(?:/|$)", re.IGNORECASE), "a segment ending in '.'"),
    (re.compile(r"(?:[ \t]|%20|%09)(?:/|$)", re.IGNORECASE), "a segment ending in white space"),
)


class AmbiguousPath(ProblemError):
    """400: the path could mean another route's resource to an upstream that normalises it."""

    status, title, slug = 400, "Bad Request", "ambiguous-path"


def refuse_ambiguous(route: Route, raw_path: str) -> None:
    """Raise AmbiguousPath when ``raw_path`` is ambiguous and ``route`` does not allow it."""
    if route.allow_ambiguous_paths:
        return
    what = ambiguity(raw_path)
    if what is not None:
        raise AmbiguousPath(
            f"The path has {what}, which an upstream may read as another path; "
            "send it without, or the route may set allow_ambiguous_paths"
        )


def ambiguity(raw_path: str) -> str | None:
    """What makes ``raw_path`` (as the client sent it, percent-encoded) ambiguous, or None.

    Such a path can match one route here and mean another route's resource to an upstream
    that decodes or normalises it (``/private;x``, ``/private.``, ``/%5cprivate``): it is
    refused unless its route sets ``allow_ambiguous_paths``. Dot segments are refused for
    every route (``has_dot_segment``).
    """
    for pattern, what in _AMBIGUOUS:
        if pattern.search(raw_path):
            return what
    return None


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    handler: Handler
    params: dict[str, str]
    upstream_path: str


class _PathGroup:
    """The routes that share one path pattern, by method."""

    def __init__(self, path: str):
        self.path = path
        segments = [s for s in path.split("/") if s]
        self.segments = len(segments)
        self.literals = sum(1 for s in segments if not _PARAM.fullmatch(s))
        pattern = "".join("/" + (f"(?P<{m.group(1)}>[^/]+)" if (m := _PARAM.fullmatch(s)) else re.escape(s)) for s in segments)
        self.regex = re.compile(rf"^{pattern}(?=/|\Z)")
        # Per method, the candidates in the order they are tried: routes with more
        # match_headers first, the route without conditions last.
        self.by_method: dict[str, list[tuple[Route, Handler, tuple[tuple[str, str], ...]]]] = {}

    def add(self, route: Route, handler: Handler) -> None:
        methods = set(route.methods or METHODS)
        if "GET" in methods:
            methods.add("HEAD")  # RFC 9110 section 9.3.2: HEAD wherever GET is
        condition = tuple(route.match_headers.items())
        for method in methods:
            candidates = self.by_method.setdefault(method, [])
            if any(existing == condition for _, _, existing in candidates):
                continue  # HEAD from a GET route does not displace an explicit HEAD route
            candidates.append((route, handler, condition))
            candidates.sort(key=lambda candidate: -len(candidate[2]))

    def pick(self, method: str, headers) -> tuple[Route, Handler] | None:
        """The first candidate for ``method`` whose match_headers all have their values in
        ``headers`` (anything with ``.get(name)``; None: no headers); None when none does."""
        for route, handler, condition in self.by_method[method]:
            if all(headers is not None and headers.get(name) == value for name, value in condition):
                return route, handler
        return None


class Router:
    """Match a request to a route and its pipeline.

    The most specific path wins: most segments, then most literal segments. A route's path
    matches itself and everything below it (``/users`` matches ``/users/7`` but not
    ``/usersx``). When the winning path has no route for the method the answer is 405 with
    ``Allow``, even if a broader route would take the method: the longest prefix decides, as
    in nginx, so a method restriction cannot be bypassed through a catch-all.
    """

    def __init__(self, routes: list[tuple[Route, Handler]]):
        groups: dict[str, _PathGroup] = {}
        for route, handler in routes:
            groups.setdefault(route.path, _PathGroup(route.path)).add(route, handler)
        self.groups = sorted(groups.values(), key=lambda g: (g.segments, g.literals), reverse=True)

    def match(self, method: str, path: str, raw_path: str | None = None, headers=None) -> Match:
        """Return the Match for ``method``, the decoded ``path`` and the request ``headers``
        (for routes with ``match_headers``).

        ``raw_path`` (still percent-encoded) is what the upstream is sent, less the route's
        prefix when it has ``strip_prefix``. Raises werkzeug's NotFound (404; also when only
        routes with unmet match_headers take the path) or MethodNotAllowed (405, with the
        allowed methods).
        """
        raw_path = raw_path or path
        for group in self.groups:
            found = group.regex.match(path)
            if found is None:
                continue
            if method not in group.by_method:
                raise MethodNotAllowed(valid_methods=sorted(group.by_method))
            entry = group.pick(method, headers)
            if entry is None:
                raise NotFound(f"No route for {path} takes a request with these headers")
            route, handler = entry
            upstream_path = raw_path
            if route.strip_prefix and group.segments:
                upstream_path = _strip_segments(raw_path, group.segments)
            return Match(route, handler, found.groupdict(), upstream_path)
        raise NotFound()


def _strip_segments(raw_path: str, count: int) -> str:
    """Remove the first ``count`` decoded segments from the percent-encoded ``raw_path``.

    A raw segment holding an encoded slash (``a%2Fb``) is two decoded segments; a prefix that
    ends inside such a segment cannot be cut from the raw path and answers 404.
    """
    raw_segments = raw_path.lstrip("/").split("/")
    consumed = 0
    for index, segment in enumerate(raw_segments):
        if consumed == count:
            return "/" + "/".join(raw_segments[index:])
        consumed += unquote(segment).count("/") + 1
        if consumed > count:
            raise NotFound()
    return "/"
