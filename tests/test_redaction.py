"""Secrets out of what Flux records: the forms of a secret, the redaction walk, and cuts."""

from __future__ import annotations

import orjson

from flux.redaction import Redactor, as_text, one_line, redact_headers

PEM = "-----BEGIN KEY-----\nPEMline1_abcdefghijklmnop\nPEMline2_qrstuvwxyz012345\n-----END KEY-----"


def test_a_secret_that_json_escaped_is_redacted_too():
    """Flux JSON-encodes log arguments, fetch bodies and thrown non-Error values; a PEM key holds line breaks."""
    secret = 'line one\nwith "quotes" and \\ backslash'
    once = orjson.dumps({"key": secret}).decode()
    twice = orjson.dumps({"message": once}).decode()
    redacted = Redactor([secret]).redact({"log": once, "error": twice, "plain": secret}, {"PEM": secret})
    assert "line one" not in orjson.dumps(redacted).decode()
    assert redacted["plain"] == "[secret:PEM]" and redacted["log"] == '{"key":"[secret:PEM]"}'


def test_another_tenants_secret_is_redacted_without_its_name():
    redactor = Redactor(["acme-token-0123456789", "globex-token-9876543210"])
    redacted = redactor.redact({"a": "x acme-token-0123456789 y", "g": "globex-token-9876543210"},
                               {"GLOBEX_TOKEN": "globex-token-9876543210"})
    assert redacted == {"a": "x [secret] y", "g": "[secret:GLOBEX_TOKEN]"}


def test_each_long_line_of_a_multi_line_secret_is_redacted_on_its_own():
    """Text cut after a line of a PEM key (an error's first line) keeps none of that line."""
    redacted = Redactor([PEM]).redact(["tj -----BEGIN KEY-----\nPEMline1_abcdefghijklmnop", "x PEMline2_qrstuvwxyz012345"],
                                      {"PEM": PEM})
    assert "PEMline" not in orjson.dumps(redacted).decode()


def test_a_number_whose_text_is_a_secret_is_redacted_whole_and_only_whole():
    redacted = Redactor(["90817263544"]).redact({"pin": 90817263544, "other": 908172635440, "ratio": 1.5}, {"PIN": "90817263544"})
    assert redacted == {"pin": "[secret:PIN]", "other": 908172635440, "ratio": 1.5}


def test_a_secret_percent_encoded_for_a_url_is_redacted():
    secret = "p@ss w/rd+&="
    redacted = Redactor([secret]).redact(["/a?k=p%40ss%20w%2Frd%2B%26%3D", "/a?k=p%40ss+w%2Frd%2B%26%3D"], {"K": secret})
    assert redacted == ["/a?k=[secret:K]"] * 2


def test_a_secret_lower_cased_is_redacted():
    """A host name: yarl and aiohttp lower-case it in URLs and in what they say."""
    assert Redactor(["SecretHostMK7"]).redact("Cannot connect to host secrethostmk7:18151", {}) == (
        "Cannot connect to host [secret]:18151")


def test_a_value_without_a_secret_is_returned_as_it_is():
    value = {"a": ["b", 1, {"c": None}]}
    assert Redactor(["s3cr3t-value"]).redact(value, {}) is value


def test_sensitive_headers_are_redacted_by_name():
    assert redact_headers({"Authorization": "Basic dTpw", "set-cookie": "s=1", "accept": "*/*"}) == {
        "Authorization": "[redacted]", "set-cookie": "[redacted]", "accept": "*/*"}


def test_a_cut_never_falls_inside_a_secret():
    """The part of a secret left before the cut would be past what redaction recognises."""
    assert as_text("aaaa-SECRET-bbbb", 8, ["SECRET"]) == ("aaaa-", True)
    assert as_text("aaaa-SECRET-bbbb", 12, ["SECRET"]) == ("aaaa-SECRET-", True)


def test_a_secret_in_bytes_is_redacted_as_in_text_and_the_other_bytes_kept():
    """A body that is not text is recorded as base64, which no scan of the record can look into."""
    redactor = Redactor(["acme-token-0123456789", "globex-token-9876543210"])
    data = b"\xff\x00acme-token-0123456789\x80globex-token-9876543210"
    assert redactor.redact_bytes(data, {"ACME": "acme-token-0123456789"}) == b"\xff\x00[secret:ACME]\x80[secret]"


def test_one_line_keeps_the_first_line_and_never_cuts_a_label():
    assert one_line("  first\nsecond") == "first"
    assert one_line("x" * 495 + "[secret:TOKEN] tail") == "x" * 495
    assert one_line("x" * 600) == "x" * 500


def test_a_long_secret_as_postgresql_cuts_it_in_an_error_is_redacted():
    """An identifier is cut at 63 bytes, a row's value in "Failing row contains" at 64 (whole characters)."""
    secret = "sk_live_" + "x" * 54 + "é" + "0123456789" * 5  # its é is bytes 62 and 63
    encoded = secret.encode()
    identifier, value = encoded[:63].decode(errors="ignore"), encoded[:64].decode(errors="ignore")
    redacted = Redactor([secret]).redact([f'relation "{identifier}" does not exist', f"Failing row contains (1, {value}..., null)."],
                                         {"KEY": secret})
    assert redacted == ['relation "[secret:KEY]" does not exist', "Failing row contains (1, [secret:KEY]..., null)."]


def test_a_secret_percent_encoded_as_the_http_client_sends_it_in_a_url_is_redacted():
    """yarl encodes a raw URL as encodeURI does, a space in the query as +: an upstream's echo of
    the URL holds that form."""
    secret = "odd sec:ret@v&al=1"
    redacted = Redactor([secret]).redact(['{"path": "/ok/odd%20sec:ret@v&al=1"}', "GET /v1?k=odd+sec:ret@v&al=1"], {"K": secret})
    assert redacted == ['{"path": "/ok/[secret:K]"}', "GET /v1?k=[secret:K]"]
