"""Reading an upstream answer's header section (app.gateway.head) gives what http.client gives.

Every case is compared with ``http.client.parse_headers`` on the same bytes: the fields, their
order and values, the parse's defects, and where the stream is left for the body.
"""
from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.gateway.head import parse_headers

TOKEN = st.text("!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
# Values as ISO-8859-1 text: printable, whitespace, control characters, bytes over 0x7f.
VALUE = st.text(st.characters(min_codepoint=0, max_codepoint=255, blacklist_characters="\r\n"), max_size=20)
ODD = st.sampled_from([
    " folded continuation",  # obsolete line folding (RFC 9112 section 5.2)
    "\tfolded with a tab",
    "no colon at all",
    "Name With Space: x",
    "Name :x",  # whitespace before the colon (RFC 9112 section 5.1 rejects it)
    ": empty name",
    "From someone",
    "X-CR: a\rb",  # a bare CR inside a value
    "X-Utf8: caf\u00e9",
])


@st.composite
def sections(draw) -> bytes:
    """A header section: plain fields, sometimes odd lines among them, CRLF or LF endings,
    the empty line at its end, and bytes of a body after it."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(ODD))
        else:
            lines.append(f"{draw(TOKEN)}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{draw(VALUE)}")
    end = draw(st.sampled_from(["\r\n", "\n"]))
    return ("".join(line + end for line in lines) + end).encode("iso-8859-1") + b"body"


def both(data: bytes) -> tuple[tuple, tuple]:
    """What each parser makes of ``data``: the fields, the defects' types, the unparsed rest
    (urllib3's assert_header_parsing looks at both), and the bytes left to read."""
    results = []
    for parse in (http.client.parse_headers, parse_headers):
        stream = io.BytesIO(data)
        message = parse(stream)
        assert isinstance(message, http.client.HTTPMessage)
        results.append((message.items(), [type(d) for d in message.defects], message.get_payload() or None, stream.read()))
    return results[0], results[1]


@settings(max_examples=400, deadline=None)
@given(sections())
def test_any_header_section_reads_as_http_client_reads_it(data):
    standard, ours = both(data)

    assert ours == standard


@pytest.mark.parametrize(
    "data",
    [
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\nok",
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n",
        b"X-Trailing: kept   \r\nX-Empty:\r\n\r\n",
        b"X-Folded: one\r\n two\r\nX-Next: 3\r\n\r\n",
        b"Broken line\r\nX-After: 1\r\n\r\n",
        b"X-Latin: \xe9t\xe9\r\n\r\n",
        b"X-Last: 1\r\n",  # the connection closed before the empty line
        b"",
    ],
)
def test_header_sections_read_as_http_client_reads_them(data):
    standard, ours = both(data)

    assert ours == standard


def test_a_line_over_64_kib_is_refused_as_http_client_refuses_it():
    data = b"X-Long: " + b"a" * 65536 + b"\r\n\r\n"

    for parse in (http.client.parse_headers, parse_headers):
        with pytest.raises(http.client.LineTooLong):
            parse(io.BytesIO(data))


def test_more_than_100_fields_are_refused_as_http_client_refuses_them():
    data = b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n"

    for parse in (http.client.parse_headers, parse_headers):
        with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
            parse(io.BytesIO(data))
