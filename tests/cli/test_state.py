from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from flux.cli.state import app, history_command
from flux.errors import ConfigError, NotFoundError
from flux.store.retention import prune
from flux.store.schema import ensure_schema
from flux.store.traces import find_request, insert_traces
from tests.traces_seed import trace

T0 = datetime(2026, 3, 10, 14, 20, 11, tzinfo=timezone.utc)
RID1 = "4f9a3b2c-0000-4000-8000-000000000001"
RID2 = "550e8400-e29b-41d4-a716-446655440000"
RID3 = "7b1d3f9a-0000-4000-8000-000000000003"


def record(conn: psycopg.Connection, table: str, op: str, *, schema: str = "public", request_id: str | None = None,
           function: str | None = None, key: Any = None, old: Any = None, new: Any = None,
           old_complete: bool | None = None, changed: list[str] | None = None, old_key: Any = None,
           context: Any = None) -> None:
    """Write one mutation in its own transaction, a minute after the previous one; JSON text passes as is."""
    n = conn.execute("SELECT count(*) FROM flux.state_mutations").fetchone()[0]
    if request_id:
        context = {"request_id": request_id, "function": function}
    conn.execute(
        "INSERT INTO flux.state_mutations (request_id, context, schema_name, table_name, op, row_key, old, new,"
        " old_complete, changed_columns, xid, commit_lsn, commit_time, seq, old_row_key)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::pg_lsn, %s, 0, %s)",
        (request_id, _j(context), schema, table, op, _j(key), _j(old), _j(new), old_complete, changed,
         1200 + n, f"0/{(n + 1) * 0x100:X}", T0 + timedelta(minutes=n), _j(old_key)),
    )


def _j(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


@pytest.fixture
def users(conn: psycopg.Connection) -> psycopg.Connection:
    """The seed's story of users / id = 42: signed up, plan cleared by a failed request, upgraded."""
    ensure_schema(conn)
    # ensure_schema made schema `flux`, which the default search_path ("$user") now puts first.
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text, plan text)")
    record(conn, "users", "insert", request_id=RID1, function="create_user", key={"id": 42},
           new={"id": 42, "email": "alice@example.com", "plan": "free"})
    record(conn, "users", "update", request_id=RID2, function="create_user", key={"id": 42}, old_complete=True,
           old={"id": 42, "email": "alice@example.com", "plan": "free"},
           new={"id": 42, "email": "alice@example.com", "plan": None}, changed=["plan"])
    record(conn, "users", "update", request_id=RID3, function="upgrade", key={"id": 42}, old_complete=True,
           old={"id": 42, "email": "alice@example.com", "plan": None},
           new={"id": 42, "email": "alice@example.com", "plan": "pro"}, changed=["plan"])
    return conn


def invoke(dsn: str, *args: str):
    return CliRunner().invoke(app, [*args, "--database", dsn])


def test_history_text_has_seed_like_lines(users, dsn):
    result = invoke(dsn, "history", "users", "--id", "42")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    assert "  Row  users / id = 42" in lines
    assert "  2026-03-10 14:20:11  req:4f9a3b2c  create_user" in lines
    assert "  + email    → alice@example.com" in lines
    assert "  + plan     → free" in lines
    assert "  2026-03-10 14:21:11  req:550e8400  create_user" in lines
    assert "    plan     → null  (was free)" in lines
    assert "    plan     → pro  (was null)" in lines


@pytest.mark.parametrize("args", [("history", "users", "--id", "42"), ("blame", "users", "--id", "42"), ("blame", "users")])
def test_history_and_blame_say_their_times_are_utc(users, dsn, args):
    """They said so only for history cut by --limit: a reader east or west of UTC took 14:20 for their own time."""
    out = [line.rstrip() for line in invoke(dsn, *args).output.splitlines()]
    assert out[3] == "  times UTC" and "2026-03-10 14:2" in "".join(out[4:])


def test_history_json_has_full_request_ids_and_fields(users, dsn):
    result = invoke(dsn, "history", "users", "--id", "42", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "public" and data["table"] == "users" and data["match"] == {"id": "42"}
    assert [m["request_id"] for m in data["mutations"]] == [RID1, RID2, RID3]
    first = data["mutations"][0]
    assert first["op"] == "insert" and first["function"] == "create_user" and first["row_key"] == {"id": 42}
    assert first["commit_time"].startswith("2026-03-10T14:20:11")
    assert data["mutations"][1]["changed_columns"] == ["plan"]


def test_history_limit_keeps_newest_and_says_so(users, dsn):
    result = invoke(dsn, "history", "users", "--id", "42", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "req:7b1d3f9a" in result.output and "req:4f9a3b2c" not in result.output
    assert "newest 1 of 3 changes" in result.output


def test_history_composite_key_via_repeated_key(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.members (org int, id text, role text, PRIMARY KEY (org, id))")
    record(conn, "members", "insert", request_id=RID1, key={"org": 1, "id": "a"}, new={"org": 1, "id": "a", "role": "admin"})
    record(conn, "members", "insert", request_id=RID2, key={"org": 2, "id": "a"}, new={"org": 2, "id": "a", "role": "guest"})
    result = invoke(dsn, "history", "members", "--key", "org=2", "--key", "id=a")
    assert result.exit_code == 0, result.output
    assert "members / org = 2, id = a" in result.output
    assert "guest" in result.output and "admin" not in result.output


def test_history_without_primary_key_matches_row_values(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.events (name text, n int)")
    record(conn, "events", "insert", request_id=RID1, new={"name": "signup", "n": 1})
    record(conn, "events", "insert", request_id=RID2, new={"name": "login", "n": 1})
    result = invoke(dsn, "history", "events", "--key", "name=signup")
    assert result.exit_code == 0, result.output
    assert "matched on row values" in result.output
    assert "req:4f9a3b2c" in result.output and "req:550e8400" not in result.output


def test_history_shows_delete_then_reinsert(users, dsn):
    record(users, "users", "delete", request_id=RID1, function="purge", key={"id": 42}, old={"id": 42}, old_complete=False)
    record(users, "users", "insert", request_id=RID2, key={"id": 42}, new={"id": 42, "email": "bob@example.com", "plan": "free"})
    out = invoke(dsn, "history", "users", "--id", "42").output
    deleted = out.index("- deleted")
    assert out.index("(only key columns of the old row are known)") > deleted
    assert out.index("+ email    → bob@example.com") > deleted


def test_history_shows_truncate(users, dsn):
    record(users, "users", "truncate", request_id=None)
    out = invoke(dsn, "history", "users", "--id", "42").output
    assert "- truncated" in out
    assert "xid:" in out and "(no request context)" in out


def test_history_and_blame_say_a_change_without_request_id_had_a_malformed_context_message(users, dsn):
    # What the engine records for `pg_logical_emit_message(true, 'flux', 'not json')`.
    record(users, "users", "update", key={"id": 42}, old_complete=True, changed=["plan"],
           old={"id": 42, "email": "alice@example.com", "plan": "pro"},
           new={"id": 42, "email": "alice@example.com", "plan": "team"},
           context={"malformed": "content is not a JSON object", "raw": "not json"})
    history = invoke(dsn, "history", "users", "--id", "42").output
    blame = invoke(dsn, "blame", "users", "--id", "42").output
    recent = invoke(dsn, "blame", "users").output
    for out in (history, blame, recent):
        assert "(malformed request context: content is not a JSON object)" in out, out
        assert "no request context" not in out
    data = json.loads(invoke(dsn, "blame", "users", "--id", "42", "--json").stdout)
    set_by = {c["column"]: c["set_by"] for c in data["columns"]}
    assert set_by["plan"]["malformed_context"] == "content is not a JSON object"
    assert set_by["email"]["malformed_context"] is None


def test_history_of_quoted_schema_and_table_names(conn, dsn):
    ensure_schema(conn)
    conn.execute('CREATE SCHEMA "my schema"; CREATE TABLE "my schema"."Tábla x" (id int PRIMARY KEY, v text)')
    record(conn, "Tábla x", "insert", schema="my schema", request_id=RID1, key={"id": 1}, new={"id": 1, "v": "ok"})
    result = invoke(dsn, "history", '"my schema"."Tábla x"', "--id", "1")
    assert result.exit_code == 0, result.output
    assert '"my schema"."Tábla x" / id = 1' in result.output and "+ v" in result.output


def test_history_json_keeps_30_digit_numeric_exact(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.acct (id int PRIMARY KEY, bal numeric)")
    record(conn, "acct", "insert", request_id=RID1, key={"id": 1}, new='{"id": 1, "bal": 123456789012345678901234567890.000000000001}')
    record(conn, "acct", "update", request_id=RID2, key={"id": 1}, old_complete=True, changed=["bal"],
           old='{"id": 1, "bal": 123456789012345678901234567890.000000000001}', new='{"id": 1, "bal": 999999999999999999999999999999}')
    result = invoke(dsn, "history", "acct", "--id", "1", "--json")
    assert result.exit_code == 0, result.output
    assert '"bal": 123456789012345678901234567890.000000000001' in result.stdout
    assert '"bal": 999999999999999999999999999999' in result.stdout


def test_history_of_unknown_table_is_not_found_with_capture_hint(users, dsn):
    result = invoke(dsn, "history", "nosuch", "--id", "1")
    assert isinstance(result.exception, NotFoundError)
    assert "No recorded mutations for table nosuch" in str(result.exception)
    assert "flux attach --tables" in result.exception.hint


def test_history_needs_id_or_key(users, dsn):
    result = invoke(dsn, "history", "users")
    assert isinstance(result.exception, ConfigError)


def test_blame_attributes_each_column_to_its_request(users, dsn):
    result = invoke(dsn, "blame", "users", "--id", "42", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    by = {c["column"]: (c["value"], c["set_by"]["request_id"]) for c in data["columns"]}
    assert by == {"id": (42, RID1), "email": ("alice@example.com", RID1), "plan": ("pro", RID3)}
    assert data["deleted"] is False


def test_blame_text_lists_columns_with_writer(users, dsn):
    out = invoke(dsn, "blame", "users", "--id", "42").output
    plan = next(line for line in out.splitlines() if line.strip().startswith("plan"))
    assert "pro" in plan and "req:7b1d3f9a" in plan and "upgrade" in plan


def test_blame_of_deleted_row_says_who_deleted_it(users, dsn):
    record(users, "users", "delete", request_id=RID2, function="purge", key={"id": 42},
           old={"id": 42, "email": "alice@example.com", "plan": "pro"}, old_complete=True)
    out = invoke(dsn, "blame", "users", "--id", "42").output
    assert "deleted  2026-03-10 14:23:11  req:550e8400  purge" in out


def _move_42_to_43(users) -> None:
    record(users, "users", "update", request_id=RID2, function="merge", key={"id": 43}, old_key={"id": 42}, old_complete=True,
           old={"id": 42, "email": "alice@example.com", "plan": "pro"},
           new={"id": 43, "email": "alice@example.com", "plan": "pro"}, changed=["id"])


def test_history_of_both_keys_shows_the_key_change_and_points_to_the_other(users, dsn):
    _move_42_to_43(users)
    old_key = invoke(dsn, "history", "users", "--id", "42").output
    assert "id       → 43  (was 42)" in old_key
    assert "primary key changed to id = 43 · the row goes on in flux state history users --id 43" in old_key
    new_key = invoke(dsn, "history", "users", "--id", "43").output
    assert "primary key changed from id = 42 · earlier changes: flux state history users --id 42" in new_key
    data = json.loads(invoke(dsn, "history", "users", "--id", "43", "--json").stdout)
    [moved] = data["mutations"]
    assert (moved["key_change"], moved["old_row_key"], moved["row_key"]) == ("in", {"id": 42}, {"id": 43})


def test_pointers_to_a_decimal_or_big_integer_key_are_commands_that_find_the_row(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.prices (id numeric PRIMARY KEY, v text)")
    big = 2**70
    record(conn, "prices", "update", request_id=RID1, key='{"id": %d}' % big, old_key='{"id": 2.5}', old_complete=True,
           old='{"id": 2.5, "v": "a"}', new='{"id": %d, "v": "a"}' % big, changed=["id"])
    out = invoke(dsn, "history", "prices", "--id", "2.5").output
    assert f"the row goes on in flux state history prices --id {big}" in out
    assert invoke(dsn, "history", "prices", "--id", str(big)).exit_code == 0
    assert "earlier changes: flux state history prices --id 2.5" in invoke(dsn, "history", "prices", "--id", str(big)).output


# Keys a terminal would show as something else (a tab as spaces, a newline as a line break), or
# that rich could read as markup or an emoji code.
ODD_KEYS = ["tab\there", "two\nlines", "cr\rand\x1bescape", "nbsp\u00a0zero\u200bwidth\u0085", "it's a \\ [bold]x[/] :smile:"]


def _bash(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run a command line as a user pasting it into bash would; `flux` is this Python's. Output
    as bytes: text mode would turn a \\r into a newline."""
    prelude = f'flux() {{ "{sys.executable}" -m flux "$@"; }}\n'
    return subprocess.run(["bash", "-c", prelude + script], env={**os.environ, **env}, capture_output=True)


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_history_command_is_one_line_that_bash_reads_back_as_the_key(key):
    command = history_command("public", "tags", {"k": key})
    assert "\n" not in command
    args = _bash(command.replace("flux", "printf '%s\\0'", 1)).stdout.decode().split("\0")
    assert args[-2] == key


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_a_printed_pointer_to_an_odd_key_run_in_bash_finds_the_row(conn, dsn, key):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.tags (k text PRIMARY KEY, v text)")
    record(conn, "tags", "insert", request_id=RID1, key={"k": key}, new={"k": key, "v": "a"})
    record(conn, "tags", "update", request_id=RID2, key={"k": "plain"}, old_key={"k": key}, old_complete=True,
           old={"k": key, "v": "a"}, new={"k": "plain", "v": "a"}, changed=["k"])
    out = invoke(dsn, "history", "tags", "--id", "plain").output
    [line] = [line for line in out.splitlines() if "earlier changes: " in line]
    command = line.split("earlier changes: ", 1)[1].rstrip()
    found = _bash(f'{command} --json --database "$DSN"', DSN=dsn)
    assert found.returncode == 0, found.stderr
    assert [m["request_id"] for m in json.loads(found.stdout)["mutations"]] == [RID1, RID2]


@pytest.mark.parametrize("row", [("--id", "2"), ()], ids=["row not found", "no row named"])
def test_the_blame_command_an_error_hints_at_names_an_odd_table_as_the_shell_reads_it(conn, dsn, row):
    """The hint said `flux state blame "My Table"`, which the shell passes as My Table: not found."""
    ensure_schema(conn)
    conn.execute('CREATE TABLE public."My Table" (id int PRIMARY KEY)')
    record(conn, "My Table", "insert", request_id=RID1, key={"id": 1}, new={"id": 1})
    result = invoke(dsn, "history", '"My Table"', *row)
    assert isinstance(result.exception, (NotFoundError, ConfigError))
    command = re.search(r"`(flux state blame [^`]+)`", result.exception.hint).group(1)
    found = _bash(f'{command} --json --database "$DSN"', DSN=dsn)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["table"] == "My Table"


def test_blame_of_an_old_key_says_where_the_row_moved(users, dsn):
    _move_42_to_43(users)
    out = invoke(dsn, "blame", "users", "--id", "42").output
    assert "moved  2026-03-10 14:23:11  req:550e8400  merge" in out
    assert "its primary key became id = 43: flux state blame users --id 43" in out
    data = json.loads(invoke(dsn, "blame", "users", "--id", "43", "--json").stdout)
    by = {c["column"]: c["set_by"]["request_id"] for c in data["columns"]}
    assert by == {"id": RID2, "email": RID1, "plan": RID3}  # followed back through the key change


def _move_acme_1_to_99(conn) -> None:
    """A composite key whose jsonb order (id, org: shorter first) is not its primary-key order (org, id)."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.members (org text, id int, role text, PRIMARY KEY (org, id))")
    record(conn, "members", "insert", request_id=RID1, key={"org": "acme", "id": 1}, new={"org": "acme", "id": 1, "role": "x"})
    record(conn, "members", "update", request_id=RID2, key={"org": "acme", "id": 99}, old_key={"org": "acme", "id": 1},
           old_complete=True, old={"org": "acme", "id": 1, "role": "x"}, new={"org": "acme", "id": 99, "role": "x"}, changed=["id"])


def test_key_change_lines_show_a_composite_key_in_primary_key_order(conn, dsn):
    _move_acme_1_to_99(conn)
    out = invoke(dsn, "history", "members", "--key", "org=acme", "--key", "id=1").output
    assert ("primary key changed to org = acme, id = 99 · the row goes on in "
            "flux state history members --key org=acme --key id=99") in out
    back = invoke(dsn, "history", "members", "--key", "org=acme", "--key", "id=99").output
    assert "primary key changed from org = acme, id = 1 · earlier changes: flux state history members --key org=acme --key id=1" in back


def test_table_blame_shows_a_composite_key_in_primary_key_order(conn, dsn):
    _move_acme_1_to_99(conn)
    assert "org = acme, id = 99" in invoke(dsn, "blame", "members").output
    rows = json.loads(invoke(dsn, "blame", "members", "--json").stdout)["rows"]
    assert list(rows[0]["row_key"]) == ["org", "id"]


def test_table_blame_shows_a_moved_row_under_its_new_key_and_where_it_came_from(users, dsn):
    _move_42_to_43(users)
    lines = [line.strip() for line in invoke(dsn, "blame", "users").output.splitlines() if "req:" in line]
    assert len(lines) == 1 and "update    id = 43  (moved from id = 42)  req:550e8400  merge" in lines[0]
    [row] = json.loads(invoke(dsn, "blame", "users", "--json").stdout)["rows"]
    assert (row["row_key"], row["moved_from"]) == ({"id": 43}, {"id": 42})


@pytest.mark.parametrize(("key", "shown"), [("42", '"42"'), (" lead space", '" lead space"'),
                                          ("7f3b1c2e-9a4d-4e8b-b1c2-3d4e5f6a7b8c", "7f3b1c2e-9a4d-4e8b-b1c2-3d4e5f6a7b8c")], ids=repr)
def test_a_text_key_reads_the_same_in_history_blame_and_table_blame(conn, dsn, key, shown):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.tags (k text PRIMARY KEY, v text)")
    record(conn, "tags", "insert", request_id=RID1, key={"k": key}, new={"k": key, "v": "a"})
    assert f"  Row  tags / k = {shown}" in invoke(dsn, "history", "tags", "--id", key).output.splitlines()
    assert f"  Blame  tags / k = {shown}" in invoke(dsn, "blame", "tags", "--id", key).output.splitlines()
    assert f"  insert    k = {shown}  req:4f9a3b2c" in invoke(dsn, "blame", "tags").output


def test_flux_why_shows_a_key_as_flux_state_does(conn, dsn):
    from flux.cli import app as flux_app

    ensure_schema(conn)
    conn.execute("CREATE TABLE public.tags (k text PRIMARY KEY, v text)")
    record(conn, "tags", "insert", request_id=RID1, key={"k": " 42"}, new={"k": " 42", "v": "a"})
    out = CliRunner().invoke(flux_app, ["why", RID1, "--database", dsn]).output
    assert 'tags  insert  k = " 42"' in out
    assert "flux state history tags --id ' 42'" in out


def test_a_row_not_found_names_the_value_as_given(users, dsn):
    result = invoke(dsn, "history", "users", "--id", " 7")
    assert isinstance(result.exception, NotFoundError)
    assert 'row users / id = " 7"' in str(result.exception)


def test_blame_without_key_lists_recently_changed_rows(users, dsn):
    record(users, "users", "insert", request_id=RID2, function="create_user", key={"id": 7}, new={"id": 7, "email": "b", "plan": "free"})
    result = invoke(dsn, "blame", "users", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(r["row_key"], r["writer"]["request_id"]) for r in rows] == [({"id": 7}, RID2), ({"id": 42}, RID3)]
    text = invoke(dsn, "blame", "users", "--limit", "1").output
    assert "id = 7" in text and "id = 42" not in text


def _twins_of_rid1_and_rid2(conn: psycopg.Connection) -> None:
    """A request whose id shares RID1's first 13 characters (a row change), and one sharing RID2's
    first 8 (a trace): as likely as not somewhere among 77,000 requests, for 8."""
    record(conn, "orders", "insert", request_id=RID1[:13] + "-ffff-000000000000", function="create_order", key={"id": 1})
    insert_traces(conn, [trace(RID2[:8] + "-ffff-4000-8000-000000000009")])


def _shown_ids(conn: psycopg.Connection, output: str) -> list[tuple[str, str]]:
    """Each request id the output shows (`req:...`), and the request `flux why` finds by it."""
    return [(prefix, find_request(conn, prefix)[0]) for prefix in re.findall(r"req:(\S+)", output)]


def test_history_shows_request_ids_that_name_one_request(users, dsn):
    _twins_of_rid1_and_rid2(users)
    result = invoke(dsn, "history", "users", "--id", "42")
    assert result.exit_code == 0, result.output
    assert _shown_ids(users, result.output) == [(RID1, RID1), (RID2[:13], RID2), (RID3[:8], RID3)]
    mutations = json.loads(invoke(dsn, "history", "users", "--id", "42", "--json").stdout)["mutations"]
    assert [m["request_id"] for m in mutations] == [RID1, RID2, RID3]


def test_blame_shows_request_ids_that_name_one_request(users, dsn):
    _twins_of_rid1_and_rid2(users)
    record(users, "users", "insert", request_id=RID2, function="create_user", key={"id": 7}, new={"id": 7, "email": "b", "plan": "free"})
    assert _shown_ids(users, invoke(dsn, "blame", "users", "--id", "42").output) == [(RID1, RID1), (RID1, RID1), (RID3[:8], RID3)]
    assert _shown_ids(users, invoke(dsn, "blame", "users").output) == [(RID2[:13], RID2), (RID3[:8], RID3)]
    rows = json.loads(invoke(dsn, "blame", "users", "--json").stdout)["rows"]
    assert [r["writer"]["request_id"] for r in rows] == [RID2, RID3]
    record(users, "users", "delete", request_id=RID2, function="purge", key={"id": 7}, old={"id": 7}, old_complete=False)
    assert _shown_ids(users, invoke(dsn, "blame", "users", "--id", "7").output)[0] == (RID2[:13], RID2)


def test_blame_of_a_row_refuses_a_limit(users, dsn):
    result = invoke(dsn, "blame", "users", "--id", "42", "--limit", "1")
    assert isinstance(result.exception, ConfigError) and "--limit" in str(result.exception)
    assert "flux state history" in result.exception.hint


@pytest.mark.parametrize("command", [["history", "users", "--id", "42"], ["blame", "users"]], ids=" ".join)
def test_a_limit_past_the_maximum_is_a_usage_error_not_a_database_error(users, dsn, command):
    result = invoke(dsn, *command, "--limit", "99999999999999999999")
    assert isinstance(result.exception, ConfigError) and "--limit" in str(result.exception)


def test_bad_key_flag_is_a_config_error(users, dsn):
    result = invoke(dsn, "history", "users", "--key", "id")
    assert isinstance(result.exception, ConfigError)


@pytest.mark.parametrize(("args", "hint"), [
    (["history", "users", "--id", "42", "--key", "id=42"], "Name a row of users with --id VALUE (its primary key is id)."),
    (["history", "users"], "Name a row of users with --id VALUE (its primary key is id); `flux state blame users` lists"),
    (["history", "users", "--key", "id"], "Name the column and its value: --key id=VALUE."),
    (["history", "users", "--key", "=42"], "Name the column and its value: --key COL=42."),
    (["history", "users", "--key", "id=1", "--key", "id=2"], "Give each column once"),
    (["history", '"unterminated', "--id", "1"], 'Close each quoted part: \'"my schema"."My Table"\''),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_usage_error_says_how_to_write_it(users, dsn, args, hint):
    result = invoke(dsn, *args)
    assert isinstance(result.exception, ConfigError)
    assert hint in (result.exception.hint or "")


def test_every_command_has_help():
    for command in ("history", "blame"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--database" in result.output


def prune_before(conn: psycopg.Connection, cutoff: datetime) -> None:
    """Prune the mutation log at about `cutoff` (the prune's own cutoff is the database's now() minus a window)."""
    prune(conn, older_than=datetime.now(timezone.utc) - cutoff, traces=False)


def test_history_whose_first_changes_were_pruned_says_so(users, dsn):
    prune_before(users, T0 + timedelta(seconds=30))  # the insert goes
    result = invoke(dsn, "history", "users", "--id", "42")
    assert "  its changes committed before 2026-03-10 14:20:" in result.output and " UTC were deleted by retention" in result.output
    data = json.loads(invoke(dsn, "history", "users", "--id", "42", "--json").stdout)
    assert data["pruned_before"].startswith("2026-03-10T14:20:")


def test_history_of_a_row_recorded_from_its_insert_does_not_mention_retention(users, dsn):
    prune_before(users, T0 - timedelta(days=1))
    assert json.loads(invoke(dsn, "history", "users", "--id", "42", "--json").stdout)["pruned_before"] is None


def test_blame_of_values_set_by_pruned_changes_says_they_were_pruned(users, dsn):
    prune_before(users, T0 + timedelta(seconds=30))
    result = invoke(dsn, "blame", "users", "--id", "42")
    assert "(set before the recorded history)" in result.output
    assert " UTC were deleted by retention" in result.output


def test_history_of_a_table_whose_changes_were_all_pruned_says_so(users, dsn):
    prune_before(users, datetime.now(timezone.utc) - timedelta(hours=1))
    result = invoke(dsn, "history", "users", "--id", "42")
    assert isinstance(result.exception, NotFoundError)
    assert " UTC were deleted by retention." in result.exception.hint


def test_history_shows_a_forged_function_name_escape_sequences_as_escapes(conn, dsn):
    """Any transaction can send a request context: its function name reaches the reader's terminal."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text)")
    record(conn, "users", "insert", request_id=RID1, function="x\x1b]0;pwned\x07", key={"id": 1}, new={"id": 1, "email": "a"})
    out = invoke(dsn, "history", "users", "--id", "1").output
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\u001b]0;pwned\\u0007" in out


def test_blame_aligns_its_columns_after_wide_characters(conn, dsn):
    from rich.cells import cell_len

    ensure_schema(conn)
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY, email text, 名前 text)")
    record(conn, "users", "insert", request_id=RID1, function="create_user", key={"id": 1},
           new={"id": 1, "email": "a@example.com", "名前": "注文番号の確認"})
    out = invoke(dsn, "blame", "users", "--id", "1").output
    rows = [line for line in out.splitlines() if "req:4f9a3b2c" in line]
    assert len(rows) == 3
    assert len({cell_len(line[:line.index("2026-")]) for line in rows}) == 1, rows


def test_history_and_blame_clip_a_long_value_and_say_how_long_it_is(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text)")
    body = "a" * 4990 + "END"
    record(conn, "docs", "insert", request_id=RID1, key={"id": 1}, new={"id": 1, "body": body})
    for command in ("history", "blame"):
        result = invoke(dsn, command, "docs", "--id", "1")
        assert result.exit_code == 0, result.output
        assert "END" not in result.output and "… (4,993 characters; whole in --json)" in result.output
    assert json.loads(invoke(dsn, "history", "docs", "--id", "1", "--json").output)["mutations"][0]["new"]["body"] == body


def test_blame_text_shows_a_column_whose_value_the_log_lacks_as_unknown(conn, dsn):
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.docs (id int PRIMARY KEY, body text, hits int)")
    record(conn, "docs", "update", request_id=RID1, key={"id": 1}, old={"id": 1}, old_complete=False,
           new={"id": 1, "hits": 1})
    conn.execute("UPDATE flux.state_mutations SET missing_columns = '{body}'")
    result = invoke(dsn, "blame", "docs", "--id", "1")
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    assert "  body      ?     (set before the recorded history)" in lines
    assert any(line.startswith("  ?: value not in the log") for line in lines)


def test_history_and_blame_show_bytea_as_psql_does_and_find_it_by_its_hex(conn, dsn, capture):
    conn.execute("CREATE TABLE public.blobs (k bytea PRIMARY KEY, data bytea)")
    running = capture(tables=["blobs"])
    conn.execute("INSERT INTO blobs VALUES ('\\x00ff', decode(repeat('ab', 150), 'hex'))")  # 302 characters as hex
    conn.execute("UPDATE blobs SET data = '\\xdeadbeef'")
    running.caught_up()
    history = invoke(dsn, "history", "blobs", "--id", "\\x00FF")  # psql reads either case; the engine writes lower
    assert history.exit_code == 0, history.output
    lines = [line.rstrip() for line in history.output.splitlines()]
    assert "  Row  blobs / k = \\x00ff" in lines
    assert f"  + data     → \\x{'ab' * 98}a… (302 characters; whole in --json)" in lines
    assert f"    data     → \\xdeadbeef  (was \\x{'ab' * 98}a… (302 characters; whole in --json))" in lines
    blame = invoke(dsn, "blame", "blobs", "--key", "k=\\x00 ff").output  # whitespace between pairs, as psql allows
    assert any(line.startswith("  data      \\xdeadbeef  ") and line.endswith("update") for line in blame.splitlines()), blame
    data = json.loads(invoke(dsn, "history", "blobs", "--id", "\\x00ff", "--json").stdout)
    assert data["key"] == {"k": "\\x00ff"} and data["mutations"][1]["new"]["data"] == "\\xdeadbeef"


def test_history_of_a_table_without_primary_key_finds_a_bytea_value_in_either_case(conn, dsn, capture):
    conn.execute("CREATE TABLE public.chunks (data bytea, n int)")
    running = capture(tables=["chunks"])
    conn.execute("INSERT INTO chunks VALUES ('\\xcafe', 1), ('\\xbeef', 2)")
    running.caught_up()
    result = invoke(dsn, "history", "chunks", "--key", "data=\\xCAFE", "--json")
    assert result.exit_code == 0, result.output
    assert [m["new"] for m in json.loads(result.stdout)["mutations"]] == [{"data": "\\xcafe", "n": 1}]


def _renamed_a_to_b(conn, capture) -> None:
    """Row 1 inserted into a, which is renamed b; then row 1 updated and row 2 inserted under b."""
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v text, w text)")
    running = capture(tables=["a"])
    conn.execute("INSERT INTO a VALUES (1, 'x', 'w0')")
    conn.execute("ALTER TABLE a RENAME TO b")  # the log keeps each change under the name its table had then
    conn.execute("UPDATE b SET v = 'z'")
    conn.execute("INSERT INTO b VALUES (2, 'y', 'w1')")
    running.caught_up()


def test_history_and_blame_under_a_renamed_tables_new_name_include_its_changes_under_the_former_name(conn, dsn, capture):
    _renamed_a_to_b(conn, capture)
    history = " ".join(invoke(dsn, "history", "b", "--id", "1").output.split())
    assert "with its changes recorded under its earlier name a (the table of the same oid, renamed since)" in history
    assert "(no request context) (recorded as a) + v → x + w → w0" in history
    assert "v → z (was x)" in history and "first recorded change is not its insert" not in history
    blame = " ".join(invoke(dsn, "blame", "b", "--id", "1").output.split())
    assert "(no request context) insert (recorded as a)" in blame and "set before the recorded history" not in blame
    table = " ".join(invoke(dsn, "blame", "b").output.split())
    assert "id = 2" in table and "id = 1" in table and "recorded as" not in table  # both rows' latest change is b's


def test_history_and_blame_json_say_the_name_each_change_was_recorded_under(conn, dsn, capture):
    _renamed_a_to_b(conn, capture)
    history = json.loads(invoke(dsn, "history", "b", "--id", "1", "--json").stdout)
    assert [(m["op"], m["recorded_as"]) for m in history["mutations"]] == [("insert", "a"), ("update", "b")]
    blame = json.loads(invoke(dsn, "blame", "b", "--id", "1", "--json").stdout)
    assert {c["column"]: c["set_by"]["recorded_as"] for c in blame["columns"]} == {"id": "a", "v": "b", "w": "a"}
    rows = json.loads(invoke(dsn, "blame", "b", "--json").stdout)["rows"]
    assert [(r["row_key"], r["writer"]["recorded_as"]) for r in rows] == [({"id": 2}, "b"), ({"id": 1}, "b")]


def test_history_and_blame_under_the_former_name_say_what_the_table_is_named_now(conn, dsn, capture):
    _renamed_a_to_b(conn, capture)
    history = " ".join(invoke(dsn, "history", "a", "--id", "1").output.split())
    assert "the table was renamed b since; its changes under both names: flux state history b --id 1" in history
    assert "v → z" not in history  # only what was recorded as a
    blame = " ".join(invoke(dsn, "blame", "a", "--id", "1").output.split())
    assert "the table was renamed b since; blame of the row now: flux state blame b --id 1" in blame
    assert json.loads(invoke(dsn, "history", "a", "--id", "1", "--json").stdout)["renamed_to"] == "b"
    assert json.loads(invoke(dsn, "history", "b", "--id", "1", "--json").stdout)["renamed_to"] is None


def test_changes_recorded_without_the_tables_oid_are_still_pointed_to_under_the_former_name(conn, dsn, capture):
    """Changes recorded before schema v7 have no `relid`: the hint of then stays."""
    _renamed_a_to_b(conn, capture)
    conn.execute("UPDATE flux.state_mutations SET relid = NULL")
    history = " ".join(invoke(dsn, "history", "b", "--id", "1").output.split())
    assert ("its first recorded change is not its insert: the row was inserted before capture started, or, if the table "
            "was renamed since, its earlier changes are recorded under the table's former name (followed from schema v7 "
            "on, by the table's oid; not for changes recorded before): flux state history OLD_NAME --id 1") in history
    assert "recorded as" not in history
    blame = " ".join(invoke(dsn, "blame", "b", "--id", "1").output.split())
    assert "w w0 (set before the recorded history)" in blame
    assert "recorded before): flux state blame OLD_NAME --id 1" in blame
    assert "+ w        → w0" in invoke(dsn, "history", "a", "--id", "1").output


def test_history_marks_an_insert_of_a_key_no_recorded_change_removed(conn, dsn, capture):
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v text)")
    running = capture(all_tables=True)
    conn.execute("INSERT INTO a VALUES (1, 'old')")
    conn.execute("DELETE FROM a")
    conn.execute("INSERT INTO a VALUES (1, 'again')")  # after a recorded delete: nothing to say
    running.caught_up()  # the engine reads the key from the catalog: a table dropped first has none
    conn.execute("DROP TABLE a")
    conn.execute("CREATE TABLE public.a (id int PRIMARY KEY, v text)")  # another table, under the same name
    conn.execute("INSERT INTO a VALUES (1, 'new')")
    running.caught_up()
    out = invoke(dsn, "history", "a", "--id", "1").output
    assert out.count("no recorded change removed the earlier row of this key") == 1
    assert out.index("no recorded change removed") > out.index("+ v        → new")
    assert "first recorded change is not its insert" not in out
