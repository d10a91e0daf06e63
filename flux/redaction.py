"""Secrets out of what Flux records and reports: the forms a secret's value takes, and one index
of every secret a project configures, built once per project load, that replaces them.

`Redactor.of(project)` holds every tenant's secrets and the shared ones. `redact(value, own)`
replaces each form of each of them, in strings and keys at any depth and in numbers whose text
is one: the requesting tenant's own secrets (`own`) as `[secret:NAME]`, any other as `[secret]`,
since a tenant must not learn another tenant's secret, nor its name or owner. A record without a
tenant (a 401) has no own secrets: everything in it is `[secret]`. `redact_bytes` does the same
in bytes, for a body that is not text, before it is encoded. Sensitive headers are `[redacted]`
by name (`redact_headers`).

Text is redacted before it is summarised: `one_line` and `as_text` shorten text without cutting
inside a secret or a label, so no part of a secret is left for redaction to miss.

What it does not do: recognise a secret transformed otherwise (base64, hashed, split across
values, a number that lost digits, cut elsewhere than PostgreSQL's known cuts), or a line of a
multi-line secret shorter than `MIN_LINE_CHARS` (too common to be told apart from other text).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, AnyStr
from urllib.parse import quote, quote_plus

import orjson

if TYPE_CHECKING:
    from flux.project import Project

SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-flux-api-key", "x-api-key"})
REDACTED = "[redacted]"
OTHER_SECRET = "[secret]"  # another tenant's secret: neither its name nor its owner is said
MIN_LINE_CHARS = 12  # a line of a multi-line secret at least this long is redacted on its own
# Where PostgreSQL cuts a value in what it says, in bytes: an identifier at NAMEDATALEN - 1
# (`relation "..." does not exist`), a row's values in an error at 64 ("Failing row contains").
PG_CUTS = (63, 64)
ERROR_CHARS = 500  # the most a one-line error summary keeps

_URI_SAFE = ";,/?:@&=+$-_.!~*'()#"  # what encodeURI leaves as it is
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LABEL = re.compile(r"\[secret(?::[^\]]*)?\]")


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in SENSITIVE_HEADERS else v) for k, v in headers.items()}


@functools.lru_cache(maxsize=4096)  # the same few values at every project load
def secret_forms(value: str) -> tuple[str, ...]:
    """A secret's value as it may appear in what Flux records, longest first:
    - as is, and lower-cased (yarl and aiohttp lower-case a URL's host in what they say);
    - percent-encoded as `encodeURIComponent` and `URLSearchParams` do, the ways to put it in a URL,
      and as `encodeURI` does, which is also how the HTTP client (yarl) encodes a secret written
      raw in a URL's path, and in its query but for a space, which it sends as `+`: an upstream
      that echoes the URL it was sent (an error's "no such path") answers it so;
    - each line of a multi-line secret (a PEM key) of at least MIN_LINE_CHARS, so that text cut
      after one of its lines, by Flux or by anything before it, keeps none of it;
    - a secret longer than 63 bytes as PostgreSQL cuts it in its errors (PG_CUTS): a long API
      key in a row that breaks a NOT NULL or CHECK constraint, or used as an identifier;
    - each of these escaped by JSON once or twice (Flux JSON-encodes log arguments, fetch bodies
      and thrown non-Error values)."""
    if not value:
        return ()
    uri = quote(value, safe=_URI_SAFE)
    base = [value, value.lower(), quote(value, safe="-_.!~*'()"), quote_plus(value, safe="-_.*"), uri, uri.replace("%20", "+")]
    lines = value.splitlines()
    if len(lines) > 1:
        base += [line for line in lines if len(line) >= MIN_LINE_CHARS]
    encoded = value.encode("utf-8", "surrogatepass")
    base += [encoded[:cut].decode("utf-8", "ignore") for cut in PG_CUTS if len(encoded) > cut]  # whole characters, as pg_mbcliplen
    forms: dict[str, None] = {}
    for form in base:
        forms[form] = None
        for _ in range(2):
            escaped = orjson.dumps(form).decode()[1:-1]
            if escaped == form:
                break
            forms[escaped] = None
            form = escaped
    return tuple(sorted(forms, key=len, reverse=True))


class Redactor:
    """Every form of every secret of a project, longest first (so that a secret containing
    another is replaced whole), with what `redact` needs precomputed.

    `redact` first looks for the forms in the value's JSON text (one C-speed scan per form, which
    JSON's escaping cannot hide a form from: it escapes character by character), and walks the
    value only when one is there; most records hold none. The scans cost about 1 us per form in a
    2 KB trace (`bench/redaction.py`): the number of secrets a project has sets it."""

    def __init__(self, values: Iterable[str]) -> None:
        owners: dict[str, set[str]] = {}
        for value in values:
            for form in secret_forms(value):
                owners.setdefault(form, set()).add(value)
        self.forms: tuple[str, ...] = tuple(sorted(owners, key=len, reverse=True))
        self.byte_forms = tuple(form.encode("utf-8", "surrogatepass") for form in self.forms)  # in a body that is not text
        self.longest = len(self.forms[0]) if self.forms else 0
        self._owners = {form: frozenset(v) for form, v in owners.items()}
        self._probes = [orjson.dumps(form).decode()[1:-1] for form in self.forms]  # as in JSON text

    @classmethod
    def of(cls, project: Project) -> Redactor:
        return cls(v for tenant in project.tenants.values() for v in tenant.secrets.values())

    def redact(self, value: Any, own: Mapping[str, str] | None = None) -> Any:
        """`value` with each secret form replaced, in keys, strings and numbers at any depth:
        `[secret:NAME]` for a secret of `own` (name -> value), `[secret]` for any other."""
        if not self.forms:
            return value
        try:
            text = orjson.dumps(value).decode()  # str: CPython searches it faster than bytes
        except TypeError:  # a lone surrogate, a huge int, a foreign type: every form is a candidate
            found = self.forms
        else:
            found = tuple(form for form, probe in zip(self.forms, self._probes) if probe in text)
        if not found:
            return value
        labels = self._labels(found, own)
        numbers = {form: label for form, label in labels.items() if _NUMBER.fullmatch(form)}

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                for form, label in labels.items():
                    if form in v:
                        v = v.replace(form, label)
                return v
            if isinstance(v, dict):
                return {walk(k): walk(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [walk(x) for x in v]
            if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
                return numbers.get(str(v) if isinstance(v, int) else orjson.dumps(v).decode(), v)  # the whole value
            return v

        return walk(value)

    def redact_bytes(self, data: bytes, own: Mapping[str, str] | None = None) -> bytes:
        """`data` with each secret form's UTF-8 bytes replaced by its label, as `redact` does in text:
        for a body that is not text, which is recorded encoded (base64), where no scan of the
        record could see a secret any more."""
        found = {form: raw for form, raw in zip(self.forms, self.byte_forms) if raw in data}
        for form, label in self._labels(found, own).items():
            data = data.replace(found[form], label.encode())
        return data

    def _labels(self, found: Iterable[str], own: Mapping[str, str] | None) -> dict[str, str]:
        """Each form's label: `[secret:NAME]` for one of `own`'s secrets, `[secret]` for any other."""
        names = {v: k for k, v in (own or {}).items()}
        labels = {}
        for form in found:
            name = next((names[v] for v in self._owners[form] if v in names), None)
            labels[form] = f"[secret:{name}]" if name is not None else OTHER_SECRET
        return labels


def one_line(text: str, limit: int = ERROR_CHARS) -> str:
    """The first line of `text`, cut to `limit` characters, never inside a `[secret...]` label.
    Give it redacted text: a secret cut here would no longer be recognised."""
    stripped = text.strip()
    line = stripped.splitlines()[0] if stripped else ""
    if len(line) <= limit:
        return line
    for label in _LABEL.finditer(line):
        if label.start() >= limit:
            break
        if label.end() > limit:
            return line[:label.start()]
    return line[:limit]


def as_text(body: AnyStr, limit: int, secrets: Sequence[AnyStr] = ()) -> tuple[AnyStr, bool]:
    """`body` cut to `limit` characters (or bytes, for bytes and secrets' bytes), and whether it
    was. Never inside one of `secrets`: the part of a secret left before the cut would be past
    what redaction recognises."""
    if len(body) <= limit:
        return body, False
    cut, moved = limit, True
    while moved:
        moved = False
        for secret in secrets:
            start = body.find(secret, max(0, cut - len(secret) + 1), cut + len(secret) - 1) if secret else -1
            if start != -1 and start < cut:
                cut, moved = start, True
    return body[:cut], True
