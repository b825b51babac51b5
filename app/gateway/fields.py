"""JSON field rules (after KrakenD's ``allow``/``deny``/``mapping``): which fields of a response
reach the client, and under which names. Plain routes and aggregate parts share this code."""
from __future__ import annotations

from dataclasses import dataclass

import pydantic_core

# Deeper JSON is refused by the parser (pydantic-core's jiter) itself, in Rust: the recursive
# rules below and json.dumps never meet more levels than this, far under Python's recursion limit.
MAX_DEPTH = 200

Tree = dict[str, "Tree | None"]  # a dotted path set as a tree; None: the whole subtree


def _tree(paths: tuple[str, ...]) -> Tree:
    """``("a.b", "c")`` as ``{"a": {"b": None}, "c": None}``; a shorter path wins over a longer."""
    root: Tree = {}
    for path in paths:
        node = root
        parts = path.split(".")
        for index, part in enumerate(parts):
            if index == len(parts) - 1:
                node[part] = None
            elif node.get(part, {}) is None:
                break  # an ancestor is already whole
            else:
                node = node.setdefault(part, {})  # type: ignore[assignment]
    return root


def _allow(value: object, tree: Tree) -> object:
    if isinstance(value, list):
        return [_allow(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    for key, sub in tree.items():
        if key in value:
            kept[key] = value[key] if sub is None else _allow(value[key], sub)
    return kept


def _deny(value: object, tree: Tree) -> object:
    if isinstance(value, list):
        return [_deny(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    for key, item in value.items():
        if key not in tree:
            kept[key] = item
        elif tree[key] is not None:
            kept[key] = _deny(item, tree[key])  # type: ignore[arg-type]
    return kept


def parse(body: bytes, allow_inf_nan: bool = True) -> object:
    """``body`` parsed as JSON text (RFC 8259); raises ValueError, with the reason and where,
    for text that is not JSON, nests deeper than about MAX_DEPTH levels, or holds a lone
    surrogate escape (``\ud800``, not Unicode), and without ``allow_inf_nan`` for ``NaN`` and
    ``Infinity``. Never RecursionError, however deep the text. The gateway's API and the
    routes' field rules both parse with it."""
    return pydantic_core.from_json(body, allow_inf_nan=allow_inf_nan)


@dataclass(frozen=True)
class FieldRules:
    """``allow`` (dotted paths kept; empty: all), then ``deny`` (dotted paths removed), then
    ``rename`` (top-level ``{old: new}``). Lists are filtered item by item, so a response that
    is a list of objects is filtered like one object."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", _tree(self.allow))
        object.__setattr__(self, "_denied", _tree(self.deny))

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny or self.rename)

    def apply(self, value: object) -> object:
        """``value`` (parsed JSON) with the rules applied; the input is not modified."""
        if self.allow:
            value = _allow(value, self._allowed)  # type: ignore[attr-defined]
        if self.deny:
            value = _deny(value, self._denied)  # type: ignore[attr-defined]
        if self.rename:
            value = self._renamed(value)
        return value

    def _renamed(self, value: object) -> object:
        if isinstance(value, list):
            return [self._renamed(item) for item in value]
        if not isinstance(value, dict):
            return value
        names = dict(self.rename)
        return {names.get(key, key): item for key, item in value.items()}
