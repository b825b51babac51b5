"""Form fields as the API's schemas take them: text into lists and numbers, so a form and a
JSON body are checked by the same models (``common.validated``)."""
from __future__ import annotations

import re

from app.api.common import invalid

_SEPARATORS = re.compile(r"[\s,]+")


def words(text: str | None) -> list[str]:
    """``"a, b c"`` as ``["a", "b", "c"]``: a list field typed on one line."""
    return [word for word in _SEPARATORS.split(text or "") if word]


def number(text: str | None, field: str) -> float | None:
    """A number of seconds typed in a form (empty: None); raises Unprocessable naming ``field``."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise invalid(field, f"{text[:40]!r} is not a number of seconds") from None


def checked(value: str | None) -> bool:
    """An HTML checkbox: present (any value) when ticked."""
    return value is not None
