from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from flux.errors import AmbiguousError, ConfigError, NotFoundError
from flux.store import traces
from flux.store.schema import drop_schema, ensure_schema
from flux.store.traces import (
    count_mutations,
    encode_trace,
    find_request,
    get_trace,
    insert_encoded_traces_async,
    insert_traces,
    list_traces,
    unique_prefixes,
)
from tests.traces_seed import FAIL, NO_TRACE, NOW, OK, OK2, bulk_mutations, fail_trace, mutation, trace


# -- writing ---------------------------------------------------------------------------------


def test_insert_then_get_round_trips_every_column(conn):
    ensure_schema(conn)
    record = fail_trace()
    insert_traces(conn, [record])
    got = get_trace(conn, FAIL)
    assert got.recorded_at is not None
    assert replace(got, recorded_at=None) == record


def test_insert_is_idempotent_on_id(conn):
    ensure_schema(conn)
    insert_traces(conn, [trace(OK)])
    insert_traces(conn, [trace(OK, status=500), trace(OK2)])
    assert conn.execute("SELECT count(*) FROM flux.trace_requests").fetchone()[0] == 2
    assert get_trace(conn, OK).status == 200


def test_insert_encoded_traces_async_writes_a_batch(dsn, conn):
    ensure_schema(conn)

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            await insert_encoded_traces_async(aconn, [encode_trace(trace(OK)), encode_trace(fail_trace())])

    asyncio.run(write())
    assert {r[0] for r in conn.execute("SELECT id FROM flux.trace_requests")} == {OK, FAIL}


def test_insert_keeps_numbers_exact_and_a_null_recording(conn):
    ensure_schema(conn)
    insert_traces(conn, [replace(trace(OK), recording=None, response={"body": {"big": 2**70, "n": 0.1}})])
    got = get_trace(conn, OK)
    assert got.recording is None
    assert got.response == {"body": {"big": 2**70, "n": 0.1}}


def test_insert_stores_a_nul_character_as_a_replacement_and_keeps_escaped_text(conn):
    ensure_schema(conn)
    body = {"nul": "a\x00b", "text": "\\u0000", "both": "\\\x00"}
    insert_traces(conn, [replace(trace(OK), request={"body": body}, path="/a\x00", error="x\x00")])
    got = get_trace(conn, OK)
    assert got.request == {"body": {"nul": "a\ufffdb", "text": "\\u0000", "both": "\\\ufffd"}}
    assert (got.path, got.error) == ("/a\ufffd", "x\ufffd")


# -- get_trace -------------------------------------------------------------------------------


def test_get_trace_by_unique_prefix(seeded):
    assert get_trace(seeded, "550e8400").id == FAIL


def test_get_trace_accepts_req_prefix_and_upper_case(seeded):
    assert get_trace(seeded, "req:550E8400").id == FAIL


def test_get_trace_ambiguous_prefix_lists_the_candidates(seeded):
    with pytest.raises(AmbiguousError) as err:
        get_trace(seeded, "91a3f")
    assert OK in err.value.hint and OK2 in err.value.hint


def test_get_trace_unknown_prefix_is_not_found(seeded):
    with pytest.raises(NotFoundError):
        get_trace(seeded, "deadbeef")


def test_get_trace_prefix_wildcards_are_literal(seeded):
    with pytest.raises(NotFoundError):
        get_trace(seeded, "91a_%")


def test_get_trace_needs_four_characters(seeded):
    with pytest.raises(ConfigError) as err:
        get_trace(seeded, "91a")
    assert "at least 4" in err.value.hint


def test_a_request_id_shorter_than_four_characters_is_found_whole(seeded):
    """A writer that sends its own request ids may send `42`: `flux state` shows it `req:42`, which
    was refused as too short to look up."""
    insert_traces(seeded, [trace("a1")])
    mutation(seeded, "users", "insert", request_id="42", key={"id": 7})
    assert get_trace(seeded, "a1").id == "a1"
    assert find_request(seeded, "req:42") == ("42", None)
    with pytest.raises(ConfigError):  # a short prefix of a longer id still is
        find_request(seeded, "a")


def test_get_trace_with_tenant_sees_only_that_tenants_traces(seeded):
    assert get_trace(seeded, "91a3f", tenant="default").id == OK  # OK2 is acme's: no longer ambiguous
    with pytest.raises(NotFoundError):
        get_trace(seeded, FAIL, tenant="default")


def test_prefix_lookup_is_a_range_scan_of_the_primary_key(seeded):
    seeded.execute("SET enable_seqscan = off")
    plan = json.dumps(seeded.execute(
        "EXPLAIN (FORMAT JSON) SELECT id FROM flux.trace_requests WHERE id LIKE %s", ("91a3f%",)
    ).fetchone()[0])
    assert "trace_requests_pkey" in plan


def test_get_trace_without_a_flux_schema_is_not_found(conn):
    with pytest.raises(NotFoundError):
        get_trace(conn, FAIL)


def test_reads_of_an_older_schema_say_how_to_upgrade(conn):
    ensure_schema(conn)
    conn.execute("DROP TABLE flux.trace_requests; UPDATE flux.meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError) as err:
        list_traces(conn)
    assert "upgrade" in err.value.hint


# -- list_traces -----------------------------------------------------------------------------


def test_list_traces_newest_first(seeded):
    assert [t.id for t in list_traces(seeded)] == [OK, FAIL, OK2]


@pytest.mark.parametrize(("status", "expected"), [("5xx", [FAIL]), ("500", [FAIL]), ("error", [FAIL]),
                                                  ("2xx", [OK, OK2]), ("4xx", [])])
def test_list_traces_filters_by_status(seeded, status, expected):
    assert [t.id for t in list_traces(seeded, status=status)] == expected


def test_list_traces_rejects_an_unknown_status_filter(seeded):
    with pytest.raises(ConfigError):
        list_traces(seeded, status="bad")


def test_list_traces_filters_by_function_tenant_and_since(seeded):
    assert [t.id for t in list_traces(seeded, function="create_user")] == [FAIL]
    assert [t.id for t in list_traces(seeded, tenant="acme")] == [FAIL, OK2]
    late = datetime.now(UTC) - NOW  # NOW is fixed at import; the suite may reach this test minutes later
    assert [t.id for t in list_traces(seeded, since=timedelta(hours=1) + late)] == [OK, FAIL]
    assert [t.id for t in list_traces(seeded, since=timedelta(minutes=2) + late)] == [OK]


def test_list_traces_by_a_status_no_trace_has_reads_the_status_index_not_every_trace(conn):
    """Without it, `flux requests --status 418` read all of trace_requests (0.85 s for 500k traces)."""
    ensure_schema(conn)
    conn.execute(
        "INSERT INTO flux.trace_requests (id, tenant, function, method, path, status, duration_ms, started_at, spans, request, response)"
        " SELECT md5(i::text), 't' || i % 5, 'f' || i % 7, 'GET', '/', CASE WHEN i % 50 = 0 THEN 500 ELSE 200 END, 1,"
        "        now() - i * interval '1 s', '[]', '{}', '{}' FROM generate_series(1, 20000) i"
    )
    conn.execute("ANALYZE flux.trace_requests")
    query, params = traces._list_query(function=None, status="418", since=None, tenant=None, limit=50)
    plan = json.dumps(conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchone()[0])
    assert "trace_requests_status_started_idx" in plan and "Seq Scan" not in plan
    assert list_traces(conn, status="418") == []


def test_list_traces_limit(seeded):
    assert [t.id for t in list_traces(seeded, limit=1)] == [OK]


def test_list_traces_summaries_carry_status_and_error(seeded):
    (row,) = list_traces(seeded, status="5xx")
    assert (row.method, row.path, row.function, row.status, row.error) == ("POST", "/signup", "create_user", 500, "Stripe API timeout")


# -- find_request and count_mutations ---------------------------------------------------------


def test_find_request_finds_a_request_with_row_changes_but_no_trace(seeded):
    assert find_request(seeded, "7b1d3f9a") == (NO_TRACE, None)


def test_find_request_prefix_must_be_unique_across_traces_and_the_log(seeded):
    mutation(seeded, "users", "insert", request_id="550e8400-ffff-4000-8000-000000000009", key={"id": 7})
    with pytest.raises(AmbiguousError) as err:
        find_request(seeded, "550e8400")
    assert FAIL in err.value.hint and "550e8400-ffff-4000-8000-000000000009" in err.value.hint


def test_find_request_of_an_unknown_request_is_not_found(seeded):
    with pytest.raises(NotFoundError):
        find_request(seeded, "deadbeef")


def test_find_request_of_a_transaction_id_from_flux_state_says_it_has_no_request(seeded):
    # `flux state` names a writer without request context `xid:N`; `flux why xid:N` is the next thing tried.
    with pytest.raises(NotFoundError) as err:
        find_request(seeded, "xid:1203")
    assert err.value.hint.startswith("xid:1203 is a transaction that sent no request context")


def _logged(conn: psycopg.Connection, request_ids: list[str]) -> None:
    """A row change of each request, in one statement."""
    conn.execute("INSERT INTO flux.state_mutations (request_id, schema_name, table_name, op, xid, commit_lsn, commit_time, seq)"
                 " SELECT r, 'public', 'users', 'insert', 1, '0/1', now(), n FROM unnest(%s::text[]) WITH ORDINALITY AS u(r, n)",
                 [request_ids])


def test_unique_prefixes_of_more_ids_than_a_statement_takes_parameters(seeded):
    """`flux requests --limit 10000` failed: seven parameters an id, and a statement takes at most 65,535."""
    ids = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(10_000)] + [f"{9_999:08x}-ffff-4000-8000-000000000000"]
    _logged(seeded, ids)
    shown = unique_prefixes(seeded, ids, 8)
    assert shown[ids[0]] == ids[0][:8] and shown[ids[-1]] == ids[-1][:13] and shown[ids[-2]] == ids[-2][:13]
    assert all(find_request(seeded, prefix)[0] == request_id for request_id, prefix in shown.items())


def test_unique_prefixes_never_show_a_prefix_that_is_another_requests_whole_id(seeded):
    _logged(seeded, ["abcd1234", "abcd1234-0000-4000", "abcd1234-0000-4000-8000"])
    assert unique_prefixes(seeded, ["abcd1234-0000-4000", "abcd1234", "abcd1234-0000-4000-8000"], 8) == {
        "abcd1234-0000-4000": "abcd1234-0000-4000", "abcd1234": "abcd1234", "abcd1234-0000-4000-8000": "abcd1234-0000-4000-8000"}


def test_unique_prefixes_look_past_the_many_row_changes_of_the_request_itself(seeded):
    bulk_mutations(seeded, "users", "insert", 50_000, request_id=OK2[:8] + "-ffff")
    shown = unique_prefixes(seeded, [OK, OK2, OK2[:8] + "-ffff"], 8)
    assert shown == {OK: OK[:8], OK2: OK2[:13], OK2[:8] + "-ffff": OK2[:8] + "-ffff"}


def test_count_mutations_counts_the_requests_rows(seeded):
    assert (count_mutations(seeded, OK), count_mutations(seeded, FAIL)) == (1, 0)


def test_drop_schema_leaves_nothing_to_find(seeded):
    drop_schema(seeded)
    with pytest.raises(NotFoundError):
        find_request(seeded, FAIL)
