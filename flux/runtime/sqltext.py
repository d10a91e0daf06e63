"""What Flux reads from a statement's text before or after PostgreSQL runs it: whether
`ctx.db.query` refuses it, and what a statement PostgreSQL tagged as a read could have written.

Pure functions over text, no I/O. They read SQL lexically (words, quoted identifiers, string
literals, dollar quotes, comments); they do not parse it, and say so where it matters.
"""

from __future__ import annotations

import re

_ENDS_TRANSACTION = frozenset({"BEGIN", "START", "COMMIT", "END", "ABORT", "ROLLBACK"})


def refusal(sql: str) -> str | None:
    """Why `ctx.db.query` refuses `sql`, if it does: it would end the request's transaction, so
    that a later throw could no longer roll the request back and later writes would run outside
    the transaction that carries the request's id; or it would leave a prepared statement on the
    pooled connection; or libpq would cut it short."""
    if "\x00" in sql:
        return "ctx.db.query: the statement holds a NUL character, which PostgreSQL cannot take (libpq would cut it there)"
    words = leading_words(sql, 1)
    if not words:
        return None
    first = words[0]
    if first == "ROLLBACK" or first == "PREPARE":
        words = leading_words(sql, 4)
        rest = words[1:]
        if first == "ROLLBACK" and rest[:1] in (["WORK"], ["TRANSACTION"]):
            rest = rest[1:]
        if first == "ROLLBACK" and rest[:1] == ["TO"]:
            return None  # back to the request's own savepoint: the transaction goes on
        if first == "PREPARE" and rest[:1] == ["TRANSACTION"]:
            first = "PREPARE TRANSACTION"
    if first in _ENDS_TRANSACTION or first == "PREPARE TRANSACTION":
        isolation = (" To choose its isolation level, run SET TRANSACTION ISOLATION LEVEL ... as the request's first "
                     "statement." if first in ("BEGIN", "START") else "")
        return (f"ctx.db.query cannot run {first}: a request's statements run in one transaction, which Flux commits "
                f"when the handler returns and rolls back when it throws. To undo part of it, use SAVEPOINT name and "
                f"ROLLBACK TO SAVEPOINT name.{isolation}")
    if first in ("PREPARE", "DEALLOCATE"):
        return (f"ctx.db.query cannot run {first}: Flux prepares statements itself, and an SQL-level prepared "
                f"statement would outlive the request on a pooled connection. Pass values as parameters ($1, $2 ...).")
    return None


# What a transaction's characteristics are set by: `SET [LOCAL | SESSION] TRANSACTION ...` and the
# settings behind it. PostgreSQL takes an isolation level or DEFERRABLE only before the
# transaction's first query.
_TRANSACTION_SETTINGS = frozenset({"TRANSACTION", "TRANSACTION_ISOLATION", "TRANSACTION_READ_ONLY",
                                   "TRANSACTION_DEFERRABLE"})


_FIRST_LETTER = re.compile(r"\s*([^\W\d_])")


def sets_transaction(sql: str) -> bool:
    """Whether `sql` sets the transaction's characteristics (its isolation level, READ ONLY,
    DEFERRABLE, a snapshot): PostgreSQL wants those before any query, so `ctx.db` runs it ahead of
    the context message when it is among the request's first statements. Not `SET SESSION
    CHARACTERISTICS`, which is for later transactions, nor `set_config(...)` in a SELECT."""
    start = _FIRST_LETTER.match(sql)
    if start is not None and start.group(1) not in "sS":  # most first statements, told at once (this runs per request)
        return False
    if leading_words(sql, 1) != ["SET"]:
        return False
    words = leading_words(sql, 3)
    name = words[2:3] if words[1:2] in (["LOCAL"], ["SESSION"]) else words[1:2]
    return bool(name) and name[0] in _TRANSACTION_SETTINGS


def leading_words(sql: str, count: int) -> list[str]:
    """The first `count` words of the statement, upper-cased, past white space, comments (block
    comments nest in PostgreSQL) and empty statements: the server skips a leading `;`, so
    `;COMMIT` is a COMMIT. A `;` after the first word ends the words (what follows is a second
    statement, which the server refuses in one query)."""
    words: list[str] = []
    i, n = 0, len(sql)
    while len(words) < count:
        i = _past_blanks(sql, i, semicolons=not words)
        if i == n or not (sql[i].isalpha() or sql[i] == "_"):
            break
        end = i + 1
        while end < n and (sql[end].isalnum() or sql[end] in "_$"):
            end += 1
        words.append(sql[i:end].upper())
        i = end
    return words


def statement_start(sql: str) -> int:
    """Where the statement's first word starts: past white space, comments and empty statements,
    as the server skips them (a query tool's or ORM's leading `/* ... */` or `-- name: ...`)."""
    return _past_blanks(sql, 0, semicolons=True)


def _past_blanks(sql: str, i: int, *, semicolons: bool) -> int:
    """The index past the white space and comments at `i` (and the `;`s, with `semicolons`)."""
    n = len(sql)
    while i < n:
        if sql[i].isspace() or (semicolons and sql[i] == ";"):
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            i = _block_comment_end(sql, i)
        else:
            break
    return i


def _block_comment_end(sql: str, i: int) -> int:
    depth, i, n = 1, i + 2, len(sql)
    while i < n and depth:
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


# One lexical token: white space, a comment's start, a string or dollar quote's start, a quoted
# identifier, a word, or any other character.
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<line>--[^\n]*)
  | (?P<block>/\*)
  | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
  | (?P<escaped>[eE]'(?:[^'\\]|\\.|'')*'?)
  | (?P<string>'(?:[^']|'')*'?)
  | (?P<quoted>"(?:[^"]|"")*"?)
  | (?P<word>[^\W\d][\w$]*)
  | (?P<other>.)
""", re.X | re.S)

# Statements that can be tagged SELECT (CREATE TABLE AS is too) and read only: their first word.
_READ_STARTS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "DECLARE", "EXPLAIN"})
# Words that make a read-tagged statement write: a data-modifying WITH, SELECT INTO (a new table),
# EXPLAIN ANALYZE (which runs the statement).
_WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "ANALYZE", "ANALYSE"})


def read_scan(sql: str) -> tuple[bool, set[str]]:
    """For a statement PostgreSQL tagged as a read (SELECT, DECLARE CURSOR, EXPLAIN): whether its
    text shows a write, and else the names it mentions (unquoted ones lower-cased), among which the
    server can find the functions and views it uses. `FOR UPDATE` is a lock, not a write.

    The text does not show a write made by a function it calls, a view or a row security
    policy it reads through: the caller asks the server about the names. Nor one made by an
    operator, a cast or a type's input function (no name of theirs is in the text)."""
    first = leading_words(sql, 1)
    if not (first[0] in _READ_STARTS if first else sql.lstrip(" \t\r\n;").startswith("(")):  # (SELECT ...) UNION ...
        return True, set()
    names: set[str] = set()
    previous = ""
    i, n = 0, len(sql)
    while i < n:
        m = _TOKEN.match(sql, i)
        assert m is not None  # `other` matches any character
        kind, i = m.lastgroup, m.end()
        if kind == "word":
            word = m.group()
            upper = word.upper()
            if upper in _WRITE_WORDS and not (upper == "UPDATE" and previous in ("FOR", "KEY")):
                return True, set()
            names.add(word.lower())
            previous = upper
        elif kind == "quoted":
            names.add(m.group()[1:-1].replace('""', '"'))
            previous = ""
        elif kind == "block":
            i = _block_comment_end(sql, m.start())
        elif kind == "dollar":
            end = sql.find(m.group(), i)
            i = n if end < 0 else end + len(m.group())
        elif kind != "space" and kind != "line":
            previous = ""
    return False, names
