"""`flux.store.names`: table names and recorded values as users type and read them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from flux.errors import ConfigError
from flux.store.names import key_text, parse_table


# -- parse_table -------------------------------------------------------------------------------


def test_parse_table_defaults_to_public_schema():
    assert parse_table("users") == ("public", "users")


def test_parse_table_splits_schema_and_folds_unquoted_case():
    assert parse_table("Billing.Invoices") == ("billing", "invoices")


def test_parse_table_keeps_quoted_names_with_dots_spaces_and_non_ascii():
    assert parse_table('"my schema"."Tábla x.y"') == ("my schema", "Tábla x.y")
    assert parse_table('"say ""hi"""') == ("public", 'say "hi"')


def test_parse_table_rejects_malformed_names():
    for bad in ["", "a.b.c", '"open', "a..b"]:
        with pytest.raises(ConfigError):
            parse_table(bad)


# -- key_text ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [
    (42, "42"), (Decimal("123456789012345678901234567890.10"), "123456789012345678901234567890.10"), (True, "true"), (None, "null"),
    ("acme", "acme"), ("7f3b1c2e-9a4d-4e8b-b1c2-3d4e5f6a7b8c", "7f3b1c2e-9a4d-4e8b-b1c2-3d4e5f6a7b8c"), ("42abc", "42abc"),
    ("42", '"42"'), ("-1.5e3", '"-1.5e3"'), ("true", '"true"'), ("null", '"null"'), ("", '""'), (" lead space", '" lead space"'),
    ("trail ", '"trail "'), ("a, b", '"a, b"'), ('say "hi"', '"say \\"hi\\""'), ("tab\there", '"tab\\there"'),
    ("zero\u200bwidth\u0085", '"zero\\u200bwidth\\u0085"'), ({"a": [1, "x"]}, '{"a":[1,"x"]}'),
    ("\\x00ff", "\\x00ff"), ("\\x", "\\x"), ("\\x0", '"\\\\x0"'), ("a\\b", '"a\\\\b"'),
], ids=repr)
def test_key_text_quotes_text_that_could_be_misread_and_nothing_else(value, shown):
    assert key_text(value) == shown
