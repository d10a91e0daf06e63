"""Table names and recorded values as users type them and read them.

`flux state` and `flux why` take table names as PostgreSQL reads them (`users`,
`billing.invoices`, `"my schema"."Tábla x"`) and key values as text; they show recorded values in
one way everywhere (`key_text`), and hints in a form that pastes back (`key_arg`, `shell_word`).
Nothing here touches a database.
"""

from __future__ import annotations

import json
import re
import shlex
import unicodedata
from decimal import Decimal
from typing import Any

import orjson

from flux.errors import ConfigError

DEFAULT_SCHEMA = "public"
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")  # text that `--id` also tries as a number
_PLAIN_IDENT = re.compile(r"[^\W\dA-Z][\w$]*")  # needs no quotes (ASCII upper case folds)
BYTEA_HEX = re.compile(r"\\x(?:[0-9a-fA-F]{2})*")  # bytea as psql prints it (the engine: lower case)
_INT64 = 2**63


# -- names -----------------------------------------------------------------------------------


def parse_table(name: str) -> tuple[str, str]:
    """`users` -> (public, users); `billing.invoices`; `"my schema"."Tábla x"`."""
    schema, table = split_table_name(name)
    return (schema or DEFAULT_SCHEMA, table)


def split_table_name(name: str) -> tuple[str | None, str]:
    """(schema or None, table). Quoted parts are taken as is (`""` is a quote); unquoted parts
    fold ASCII to lower case, as Postgres does."""
    parts: list[str] = []
    i, n = 0, len(name)
    while True:
        while i < n and name[i].isspace():
            i += 1
        if i < n and name[i] == '"':
            buf: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise ConfigError(f"Unterminated quoted identifier in table name {name!r}",
                                      hint='Close each quoted part: \'"my schema"."My Table"\'; inside one, write "" for a ".')
                if name[i] == '"':
                    if i + 1 < n and name[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(name[i])
                i += 1
            part = "".join(buf)
            while i < n and name[i].isspace():
                i += 1
        else:
            start = i
            while i < n and name[i] not in '."':
                i += 1
            part = _fold(name[start:i].strip())
        if not part:
            raise ConfigError(f"Empty name part in table name {name!r}", hint='Write TABLE or SCHEMA.TABLE; quote odd names: \'"my schema"."My Table"\'.')
        parts.append(part)
        if i >= n:
            break
        if name[i] != ".":
            raise ConfigError(f"Unexpected {name[i]!r} in table name {name!r}", hint='Quote names with odd characters: \'"my schema"."My Table"\'.')
        i += 1
    if len(parts) > 2:
        raise ConfigError(f"Too many dots in table name {name!r}", hint="Write TABLE or SCHEMA.TABLE.")
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def quote_name(name: str) -> str:
    return name if _PLAIN_IDENT.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def format_table(schema: str, table: str) -> str:
    """The inverse of `parse_table`: `users`, `billing.invoices`, `"my schema"."Tábla x"`."""
    return quote_name(table) if schema == DEFAULT_SCHEMA else f"{quote_name(schema)}.{quote_name(table)}"


def _fold(part: str) -> str:
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in part)


def hidden(char: str) -> bool:
    """A character a terminal does not show as itself: a control or format character (a tab
    shows as spaces, a newline breaks the line, a zero-width space shows as nothing), a line or
    paragraph separator, a space other than U+0020."""
    category = unicodedata.category(char)
    return category in ("Cc", "Cf", "Cs", "Zl", "Zp") or (category == "Zs" and char != " ")


def visible(text: str) -> str:
    """`text` with each character a terminal does not show as itself written as its escape (`\\n`,
    `\\u001b`): recorded text (a path, an error, a span name) is the client's or the function's,
    and an escape sequence in it would otherwise reach the reader's terminal and act there."""
    if not any(map(hidden, text)):
        return text
    return "".join(_SHORT_ESCAPES.get(c) or _json_escape(c) if hidden(c) else c for c in text)


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


_DOLLAR_ESCAPES = {"\\": "\\\\", "'": "\\'", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def shell_word(text: str) -> str:
    """`text` as one shell word that survives being shown in a terminal and pasted back.

    shlex.quote, unless the text holds a character a terminal does not show as itself (a tab
    shows as spaces, a newline breaks the line): then bash's $'...' form, with each such
    character escaped as its UTF-8 bytes (\\xHH, which bash reads back in any locale; zsh too).
    """
    if not any(hidden(c) for c in text):
        return shlex.quote(text)
    return "$'" + "".join(map(_dollar_escape, text)) + "'"


def quoted_word(text: str) -> str:
    """`shell_word`, always quoted: a suggestion in a sentence ('sales.orders') reads as one, and
    pastes back whatever it holds (a name with a quote in it was cut short in hand-made quotes)."""
    word = shell_word(text)
    return word if word.startswith(("'", "$'")) else f"'{word}'"


def _dollar_escape(char: str) -> str:
    if char in _DOLLAR_ESCAPES:
        return _DOLLAR_ESCAPES[char]
    if hidden(char):
        return "".join(f"\\x{b:02x}" for b in char.encode("utf-8", "surrogatepass"))
    return char


# -- values as text --------------------------------------------------------------------------


def key_text(value: Any) -> str:
    """A recorded value as Flux shows it, in `flux why`, history and blame alike: text bare unless
    it could be misread, then as a JSON string; anything else as compact JSON, numbers exact.

    Misread: text that is empty, has spaces at either end, holds a character JSON escapes or a
    terminal does not show as itself, holds `, ` (which separates key columns), or that `--id`
    would also try as a number, boolean or null (`"42"`, `"true"`). A `bytea` value (`\\x00ff`,
    its backslash one JSON escapes) is shown bare, as psql shows it: JSON would double the backslash.
    """
    if isinstance(value, str) and _plain(value) and not (NUMBER.fullmatch(value) or value in ("true", "false", "null")):
        return value
    return _json_text(value)


def given_text(text: str) -> str:
    """A value as given to `--id`/`--key`, as Flux shows it: as `key_text`, except that text that
    reads as a number stays bare (it was given as text, and is matched in each of its forms)."""
    return text if _plain(text) else _json_text(text)


def key_arg(value: Any) -> str:
    """A recorded key value as `--id`/`--key` take it (its forms match what was recorded): text as
    it is, numbers as their digits, exact past 64 bits too."""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _plain(text: str) -> bool:
    if BYTEA_HEX.fullmatch(text):
        return True
    return (text != "" and text == text.strip() and ", " not in text and not any(map(hidden, text))
            and json.dumps(text, ensure_ascii=False) == f'"{text}"')


def _json_text(value: Any) -> str:
    text = orjson.dumps(value, default=_exact).decode()
    # JSON leaves DEL, C1 controls and invisible characters as they are; a terminal would not show them.
    return "".join(_json_escape(c) if ord(c) >= 0x7F and hidden(c) else c for c in text)


def _json_escape(char: str) -> str:
    units = char.encode("utf-16-be", "surrogatepass")
    return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    return str(value)


# -- decoding --------------------------------------------------------------------------------


def _int_or_decimal(text: str) -> int | Decimal:
    value = int(text)
    return value if -_INT64 <= value < _INT64 else Decimal(text)  # orjson stops at 64 bits


def load_json(text: str | None) -> Any:
    """jsonb text -> Python, keeping numbers exact (Decimal, or int within 64 bits)."""
    if text is None:
        return None
    return json.loads(text, parse_float=Decimal, parse_int=_int_or_decimal)
