"""JSON field rules: allow, deny and rename, on objects, nested paths and lists."""
from __future__ import annotations

from app.gateway.fields import FieldRules

USER = {"id": 7, "name": "ann", "password_hash": "x", "address": {"city": "Oslo", "street": "Main", "geo": {"lat": 1}}}


def test_no_rules_leave_the_value_as_it_is():
    assert not FieldRules()
    assert FieldRules().apply(USER) == USER


def test_allow_keeps_only_the_named_fields_nested_paths_included():
    rules = FieldRules(allow=("id", "address.city", "missing"))

    assert rules.apply(USER) == {"id": 7, "address": {"city": "Oslo"}}
    assert USER["address"]["street"] == "Main"  # the input is not changed


def test_a_shorter_allowed_path_keeps_the_whole_subtree():
    assert FieldRules(allow=("address", "address.city")).apply(USER)["address"] == USER["address"]
    assert FieldRules(allow=("address.city", "address")).apply(USER)["address"] == USER["address"]


def test_deny_removes_the_named_fields_nested_paths_included():
    rules = FieldRules(deny=("password_hash", "address.geo", "nothing.here"))

    assert rules.apply(USER) == {"id": 7, "name": "ann", "address": {"city": "Oslo", "street": "Main"}}


def test_rename_renames_top_level_fields_after_allow_and_deny():
    rules = FieldRules(allow=("id", "name", "password_hash"), deny=("password_hash",), rename=(("name", "username"),))

    assert rules.apply(USER) == {"id": 7, "username": "ann"}


def test_a_list_of_objects_is_filtered_item_by_item():
    rules = FieldRules(deny=("password_hash",), rename=(("id", "user_id"),))

    assert rules.apply([USER, {"id": 8, "password_hash": "y"}, 3]) == [
        {"user_id": 7, "name": "ann", "address": USER["address"]},
        {"user_id": 8},
        3,
    ]


def test_values_that_are_not_objects_pass_through():
    assert FieldRules(deny=("a",)).apply("text") == "text"
    assert FieldRules(allow=("a.b",)).apply({"a": [1, {"b": 2, "c": 3}]}) == {"a": [1, {"b": 2}]}
