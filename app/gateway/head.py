"""An upstream answer's header section, read the way http.client reads it, without its cost.

http.client hands every header section to the ``email`` package's feed parser, which is built
for mail: it cost about a tenth of a proxied request's CPU (bench/README.md, "2026-12-07,
night: issue 15's last sitting"). ``parse_headers`` reads the same lines with the same limits and builds the same
``http.client.HTTPMessage`` directly when every line is a plain ``name: value`` field (RFC 9112
section 5: a token, a colon, optional whitespace, a value without CR or LF). Anything else
(obsolete line folding, a line without a colon, a name that is not a token, a bare CR) goes to
the standard library's own parser, so what is unusual is read exactly as http.client reads it.

``UpstreamResponse`` is http.client's response with that function in place of its own; the
connection classes at the end are urllib3's, answering with it (app.gateway.forward's pools).
"""
from __future__ import annotations

import email.parser
import http.client
import re
import types

from urllib3.connection import HTTPConnection, HTTPSConnection

# One field line as RFC 9112 section 5 writes it, decoded as ISO-8859-1 like http.client does:
# the name, then the value with its leading whitespace dropped (trailing whitespace is kept,
# as the email package's compat32 policy keeps it).
_FIELD_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*)\r?\n")
_MAXLINE = 65536  # bytes per line, and at most _MAXHEADERS lines: http.client's limits
_MAXHEADERS = 100
_END = (b"\r\n", b"\n", b"")


def read_lines(fp) -> list[bytes]:
    """The header section's lines from ``fp`` (a binary file), the empty line that ends it
    included. Raises http.client.LineTooLong for a line over 64 KiB and HTTPException for
    more than 100 lines, as http.client does."""
    lines = []
    while True:
        line = fp.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAXHEADERS:
            raise http.client.HTTPException(f"got more than {_MAXHEADERS} headers")
        if line in _END:
            return lines


def parse_headers(fp, _class: type[http.client.HTTPMessage] = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """The header section read from ``fp`` as an ``HTTPMessage``: what
    ``http.client.parse_headers`` returns for the same bytes, the same errors included."""
    lines = read_lines(fp)
    message = _class()
    for line in lines[:-1]:
        field = _FIELD_LINE.fullmatch(line.decode("iso-8859-1"))
        if field is None:
            return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
        message.set_raw(*field.groups())
    return message


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, whose ``begin`` (status line, 1xx answers skipped, framing,
    keep-alive) runs unchanged but for the header section, read by ``parse_headers`` above."""

    # The standard library's own function, run with this module's parse_headers in its globals.
    begin = types.FunctionType(
        http.client.HTTPResponse.begin.__code__, {**vars(http.client), "parse_headers": parse_headers}, "begin"
    )


class UpstreamConnection(HTTPConnection):
    """urllib3's connection, answering with ``UpstreamResponse``."""

    response_class = UpstreamResponse


class UpstreamTLSConnection(HTTPSConnection):
    """urllib3's TLS connection, answering with ``UpstreamResponse``."""

    response_class = UpstreamResponse
