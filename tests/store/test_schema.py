from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from flux.errors import ConfigError, DatabaseError
from flux.store import queries, renames, schema
from flux.store.schema import SCHEMA_VERSION, ensure_schema, schema_version

# Each older version as its DDL left the log: a current schema taken back step by step.
V7_IDENTITIES = """
ALTER TABLE flux.replica_identity_changes DROP COLUMN relid,
    ADD CONSTRAINT replica_identity_changes_pkey PRIMARY KEY (slot_name, schema_name, table_name);
UPDATE flux.meta SET value = '7' WHERE key = 'schema_version';
"""

V6_LOG = """
DELETE FROM flux.meta WHERE key = 'relids';
DROP INDEX flux.state_mutations_relid_idx;
ALTER TABLE flux.state_mutations DROP COLUMN relid;
UPDATE flux.meta SET value = '6' WHERE key = 'schema_version';
"""

V5_LOG = """
DROP INDEX flux.state_mutations_truncate_idx;
DROP INDEX flux.trace_requests_status_started_idx;
UPDATE flux.meta SET value = '5' WHERE key = 'schema_version';
"""

V4_LOG = """
DROP INDEX flux.state_mutations_old_row_hash_idx;
ALTER TABLE flux.state_mutations DROP COLUMN old_row_key;
UPDATE flux.meta SET value = '4' WHERE key = 'schema_version';
"""

V3_LOG = """
DROP INDEX flux.state_mutations_table_hash_idx;
DROP INDEX flux.state_mutations_id_idx;
DROP FUNCTION flux.table_hash(text, text);
CREATE INDEX state_mutations_table_lsn_idx ON flux.state_mutations (schema_name, table_name, commit_lsn, seq);
ALTER TABLE flux.state_mutations
    DROP CONSTRAINT state_mutations_pkey,
    ADD CONSTRAINT state_mutations_pkey PRIMARY KEY (id),
    ADD CONSTRAINT state_mutations_commit_lsn_seq_key UNIQUE (commit_lsn, seq);
UPDATE flux.meta SET value = '3' WHERE key = 'schema_version';
"""

V2_TABLES = """
DROP TABLE flux.trace_requests;
UPDATE flux.meta SET value = '2' WHERE key = 'schema_version';
"""

V1_INDEXES = """
DROP INDEX flux.state_mutations_row_hash_idx;
DROP INDEX flux.state_mutations_table_lsn_idx;
DROP FUNCTION flux.row_hash(text, text, jsonb);
CREATE INDEX state_mutations_row_idx
    ON flux.state_mutations (schema_name, table_name, row_key, commit_lsn DESC, seq DESC);
CREATE INDEX state_mutations_table_idx
    ON flux.state_mutations (schema_name, table_name, commit_lsn DESC, seq DESC);
UPDATE flux.meta SET value = '1' WHERE key = 'schema_version';
"""


def _indexes(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT indexname::text FROM pg_indexes WHERE schemaname = 'flux' AND tablename = 'state_mutations'")
    return {r[0] for r in rows}


def _insert(conn: psycopg.Connection, table: str, key: int, lsn: int) -> None:
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
        " VALUES ('public', %s, 'insert', %s, %s, 1, %s::pg_lsn, now(), 0)",
        (table, json.dumps({"id": key}), json.dumps({"id": key}), f"0/{lsn:X}"),
    )


def _as_v7(conn: psycopg.Connection) -> None:
    ensure_schema(conn)
    conn.execute(V7_IDENTITIES)


def _as_v6(conn: psycopg.Connection) -> None:
    _as_v7(conn)
    conn.execute(V6_LOG)


def _as_v5(conn: psycopg.Connection) -> None:
    _as_v6(conn)
    conn.execute(V5_LOG)


def _as_v4(conn: psycopg.Connection) -> None:
    _as_v5(conn)
    conn.execute(V4_LOG)


def _as_v3(conn: psycopg.Connection) -> None:
    _as_v4(conn)
    conn.execute(V3_LOG)


def _as_v2(conn: psycopg.Connection) -> None:
    _as_v3(conn)
    conn.execute(V2_TABLES)


def _as_v1(conn: psycopg.Connection) -> None:
    _as_v2(conn)
    conn.execute(V1_INDEXES)


def _with_one_recorded_user(conn: psycopg.Connection, as_older: Callable[[psycopg.Connection], None]) -> None:
    """An older schema (made by `as_older`) whose log holds one change of public.users, id 7."""
    as_older(conn)
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    _insert(conn, "users", 7, 0x100)


def _has_traces(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('flux.trace_requests') IS NOT NULL").fetchone()[0]


def test_ensure_schema_creates_the_current_version_then_changes_nothing(conn):
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION == 8
    assert _has_traces(conn)
    assert ensure_schema(conn) is False


def test_trace_ids_are_c_collated_so_prefix_lookups_use_the_primary_key(conn):
    ensure_schema(conn)
    collation = conn.execute(
        "SELECT collation_name FROM information_schema.columns"
        " WHERE table_schema = 'flux' AND table_name = 'trace_requests' AND column_name = 'id'"
    ).fetchone()[0]
    assert collation == "C"


def _constraints(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'flux.state_mutations'::regclass"
        " AND contype IN ('p', 'u')"
    )
    return dict(rows.fetchall())


def test_ensure_schema_upgrades_v7_to_v8_keying_replica_identity_records_by_oid(conn):
    _as_v7(conn)
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    conn.execute("INSERT INTO flux.replica_identity_changes (slot_name, schema_name, table_name, previous)"
                 " VALUES ('flux', 'public', 'users', 'd'), ('flux', 'public', 'gone', 'd')")
    # An event trigger's function of before: it writes the records as v7 kept them.
    conn.execute("CREATE FUNCTION flux.capture_new_tables() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END'")
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert conn.execute("SELECT relid::regclass::text, previous FROM flux.replica_identity_changes").fetchall() == [
        ("users", "d")]  # a record naming no table has nothing left to restore
    assert conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'replica_identity_changes_pkey'"
                        ).fetchone()[0] == "PRIMARY KEY (slot_name, relid)"
    assert "ON CONFLICT (slot_name, relid)" in conn.execute(
        "SELECT prosrc FROM pg_proc WHERE oid = 'flux.capture_new_tables()'::regprocedure").fetchone()[0]
    assert ensure_schema(conn) is False


def test_ensure_schema_upgrades_v6_to_v7_recording_table_oids_and_keeps_the_log(conn):
    _with_one_recorded_user(conn, _as_v6)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _valid(conn, "state_mutations_relid_idx") is True
    assert conn.execute("SELECT relid FROM flux.state_mutations").fetchall() == [(None,)]  # not known for it
    assert schema.relids_from(conn) == 2  # the oids recorded from the upgrade on are this database's
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [(m.new, m.recorded_as) for m in history.mutations] == [({"id": 7}, "users")]


def test_ensure_schema_upgrades_v5_to_v6_indexing_truncates_and_keeps_the_log(conn):
    _with_one_recorded_user(conn, _as_v5)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert "state_mutations_truncate_idx" in _indexes(conn)
    assert _valid(conn, "trace_requests_status_started_idx") is True
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [m.new for m in history.mutations] == [{"id": 7}]


def test_ensure_schema_upgrades_v4_to_v5_recording_old_keys_and_keeps_the_log(conn):
    _with_one_recorded_user(conn, _as_v4)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert "state_mutations_old_row_hash_idx" in _indexes(conn)
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [(m.new, m.old_row_key) for m in history.mutations] == [({"id": 7}, None)]


def test_ensure_schema_upgrades_v3_to_v4_with_cheaper_indexes_and_keeps_the_log(conn):
    _with_one_recorded_user(conn, _as_v3)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _constraints(conn) == {"state_mutations_pkey": "PRIMARY KEY (commit_lsn, seq)"}
    names = _indexes(conn)
    assert {"state_mutations_table_hash_idx", "state_mutations_id_idx", "state_mutations_row_hash_idx"} <= names
    assert "state_mutations_table_lsn_idx" not in names
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [m.new for m in history.mutations] == [{"id": 7}]
    assert [c.row_key for c in queries.table_blame(conn, "public", "users", limit=5)] == [{"id": 7}]


def test_ensure_schema_upgrades_v2_to_v3_adding_traces_and_keeping_the_log(conn):
    _with_one_recorded_user(conn, _as_v2)
    assert not _has_traces(conn)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _has_traces(conn)
    indexes = {r[0] for r in conn.execute("SELECT indexname::text FROM pg_indexes WHERE tablename = 'trace_requests'")}
    assert {"trace_requests_started_idx", "trace_requests_tenant_started_idx", "trace_requests_function_started_idx"} <= indexes
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [m.new for m in history.mutations] == [{"id": 7}]


def test_ensure_schema_upgrades_v1_to_the_current_version_in_place_and_keeps_the_log(conn):
    _with_one_recorded_user(conn, _as_v1)
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    names = _indexes(conn)
    assert {"state_mutations_row_hash_idx", "state_mutations_table_hash_idx"} <= names
    assert not {"state_mutations_row_idx", "state_mutations_table_idx", "state_mutations_table_lsn_idx"} & names
    assert _has_traces(conn)
    history = queries.row_history(conn, "public", "users", id_value="7")
    assert [m.new for m in history.mutations] == [{"id": 7}]


def test_reads_of_an_older_schema_say_how_to_upgrade_and_what_that_does_to_older_processes(conn):
    """A newer CLI's hint (a support engineer's) said only to upgrade: the deployment's older
    processes then refuse to start again on the schema."""
    _as_v1(conn)
    with pytest.raises(ConfigError) as err:
        queries.row_history(conn, "public", "users", id_value="7")
    assert "flux attach" in err.value.hint and "schema version 1" in err.value.hint and "refuse to start" in err.value.hint


def test_ensure_schema_refuses_a_newer_schema(conn):
    ensure_schema(conn)
    conn.execute("UPDATE flux.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigError) as err:
        ensure_schema(conn)
    # Flux installs from its source: `pip install -U flux` would fetch whatever PyPI has by that name.
    assert "Upgrade Flux" in err.value.hint and "pip install -e ." in err.value.hint and "-U flux" not in err.value.hint


def _users_and_orders(conn: psycopg.Connection) -> None:
    """20,000 recorded inserts into each of public.users and public.orders (the table exists: row matching reads its key)."""
    ensure_schema(conn)
    conn.execute("CREATE TABLE public.users (id int PRIMARY KEY)")
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
        " SELECT 'public', t, 'insert', jsonb_build_object('id', i), jsonb_build_object('id', i), 1,"
        "        ('0/' || to_hex(i * 16 + length(t)))::pg_lsn, now(), 0"
        "   FROM generate_series(1, 20000) i, unnest(ARRAY['users', 'orders']) t"
    )


def _user_history_plan(conn: psycopg.Connection) -> str:
    """The plan of user 42's history, as JSON text, once the log is analyzed."""
    conn.execute("ANALYZE flux.state_mutations")
    match = queries._row_match(conn, "public", "users", "42", None)
    query, params = queries._row_query("public", "users", match, None)
    plan = json.dumps(conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()[0])
    return plan


def test_row_history_finds_the_row_through_the_hash_index(conn):
    _users_and_orders(conn)
    plan = _user_history_plan(conn)
    assert "state_mutations_row_hash_idx" in plan and "state_mutations_old_row_hash_idx" in plan
    assert "Seq Scan" not in plan


def _renamed_users_and_orders(conn: psycopg.Connection) -> int:
    """`_users_and_orders`, with users' changes recorded under its oid and a former name, `people`, for its older half."""
    _users_and_orders(conn)
    oid = conn.execute("SELECT 'public.users'::regclass::oid::int").fetchone()[0]
    conn.execute("UPDATE flux.state_mutations SET relid = %s WHERE table_name = 'users'", (oid,))
    conn.execute("UPDATE flux.state_mutations SET table_name = 'people' WHERE table_name = 'users'"
                 " AND (row_key->>'id')::int <= 10000")
    conn.execute("ANALYZE flux.state_mutations")
    return oid


def test_the_former_names_of_a_table_are_found_through_the_relid_index(conn):
    oid = _renamed_users_and_orders(conn)
    plan = json.dumps(conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) " + renames.OID_NAMES), {"relid": oid}).fetchone()[0])
    assert "state_mutations_relid_idx" in plan
    assert "Seq Scan" not in plan and "Sort" not in plan
    assert renames.table_names(conn, "public", "users") == renames.Names(oid, (("public", "people"),))


def test_row_history_under_a_former_name_finds_the_row_through_the_hash_index(conn):
    _renamed_users_and_orders(conn)
    names = renames.table_names(conn, "public", "users")
    match = queries._row_match(conn, "public", "users", "42", None)
    query, params = queries._row_query("public", "users", match, None, names)
    plan = json.dumps(conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()[0])
    assert "state_mutations_row_hash_idx" in plan and "Seq Scan" not in plan
    assert [m.recorded_as for m in queries._fetch_row(conn, "public", "users", match, None, names)[1]] == ["people"]


def test_table_blame_reads_the_latest_changes_through_the_table_hash_index(conn):
    ensure_schema(conn)
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
        " SELECT 'public', t, 'insert', jsonb_build_object('id', i), jsonb_build_object('id', i), 1,"
        "        ('0/' || to_hex(i * 16 + n))::pg_lsn, now(), 0"
        "   FROM generate_series(1, 20000) i, unnest(ARRAY['users', 'orders', 'items', 'carts']) WITH ORDINALITY u(t, n)"
    )
    conn.execute("ANALYZE flux.state_mutations")
    query = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + queries._recent_query(paged=True)
    params = {"schema": "public", "table": "users", "lsn": "0/FFFFFFFF", "seq": 0, "batch": 500}
    plan = json.dumps(conn.execute(query, params).fetchone()[0])
    assert "state_mutations_table_hash_idx" in plan
    assert "Seq Scan" not in plan and "Sort" not in plan


def test_row_history_of_a_wide_numeric_key_reads_the_tables_mutations_through_the_table_hash_index(conn):
    """Seven numeric columns are 128 typed combinations: compared column by column, not hashed."""
    ensure_schema(conn)
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, row_key, new, xid, commit_lsn, commit_time, seq)"
        " SELECT 'public', t, 'insert', k, k, 1, ('0/' || to_hex(i * 16 + n))::pg_lsn, now(), 0"
        "   FROM generate_series(1, 20000) i, unnest(ARRAY['wide', 'orders', 'items', 'carts']) WITH ORDINALITY u(t, n),"
        "        LATERAL (SELECT jsonb_object_agg('c' || c, i + c) FROM generate_series(1, 7) c) j(k)"
    )
    conn.execute("ANALYZE flux.state_mutations")
    match = queries._row_match(conn, "public", "wide", None, {f"c{c}": str(42 + c) for c in range(1, 8)})
    query, params = queries._row_query("public", "wide", match, None)
    plan = json.dumps(conn.execute(psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()[0])
    assert "state_mutations_table_hash_idx" in plan
    assert "Seq Scan" not in plan
    assert len(queries._fetch_row(conn, "public", "wide", match, None)[1]) == 1


def test_an_upgrade_leaves_statistics_for_its_new_column_and_indexes(conn):
    """Without them the planner guessed, and read a row's history by scanning the whole log (1.4 s at
    5 million rows) until an autovacuum analyze, due only after a tenth of the log more was written."""
    _with_one_recorded_user(conn, _as_v1)
    conn.execute("ANALYZE flux.state_mutations")
    ensure_schema(conn)
    stats = {r[0] for r in conn.execute("SELECT tablename::text || '.' || attname::text FROM pg_stats WHERE schemaname = 'flux'")}
    assert {"state_mutations.old_row_key", "state_mutations_row_hash_idx.row_hash", "state_mutations_table_hash_idx.table_hash"} <= stats


def test_row_history_finds_later_truncates_through_the_truncate_index(conn):
    """Without it, the truncates after a row's first change were looked for among all of its
    table's changes, or by a scan of the whole log (1 to 4 s at 5 million rows)."""
    _users_and_orders(conn)
    conn.execute(
        "INSERT INTO flux.state_mutations (schema_name, table_name, op, xid, commit_lsn, commit_time, seq)"
        " VALUES ('public', 'users', 'truncate', 2, '1/0', now(), 0)"
    )
    plan = _user_history_plan(conn)
    assert "state_mutations_truncate_idx" in plan
    assert "Seq Scan" not in plan
    match = queries._row_match(conn, "public", "users", "42", None)
    assert [m.op for m in queries._fetch_row(conn, "public", "users", match, None)[1]] == ["insert", "truncate"]


def _locks(conn: psycopg.Connection, pid: int) -> set[tuple[str, bool]]:
    rows = conn.execute(
        "SELECT mode, granted FROM pg_locks WHERE pid = %s AND relation = 'flux.state_mutations'::regclass", (pid,))
    return set(rows.fetchall())


def test_an_upgrade_builds_its_index_concurrently_so_the_log_takes_writes_meanwhile(conn, dsn):
    """A plain CREATE INDEX (and v5's, after its ADD COLUMN, under ACCESS EXCLUSIVE) held every
    write of the engine and the gateway back until the index was built: 12 s at 5 million rows."""
    _with_one_recorded_user(conn, _as_v5)
    with psycopg.connect(dsn) as writing, psycopg.connect(dsn, autocommit=True) as upgrading, \
            psycopg.connect(dsn, autocommit=True) as other:
        _insert(writing, "users", 8, 0x200)  # an engine transaction in flight: a build waits for it
        pid = upgrading.info.backend_pid
        with ThreadPoolExecutor(1) as pool:
            upgrade = pool.submit(ensure_schema, upgrading)
            try:
                deadline = time.monotonic() + 10
                while not conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                       (pid,)).fetchone()[0]:
                    assert time.monotonic() < deadline, "the upgrade never waited for the open transaction"
                    time.sleep(0.02)
                assert _locks(conn, pid) == {("ShareUpdateExclusiveLock", True)}
                other.execute("SET lock_timeout = '1s'")
                _insert(other, "users", 9, 0x300)  # not queued behind the build
            finally:
                writing.commit()  # lets the upgrade finish, also when an assertion failed
            assert upgrade.result(timeout=30) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _valid(conn, "state_mutations_truncate_idx") is True


def _valid(conn: psycopg.Connection, index: str) -> bool | None:
    row = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (f"flux.{index}",)).fetchone()
    return row[0] if row else None


def test_an_upgrade_rebuilds_the_invalid_index_an_interrupted_concurrent_build_left(conn):
    _with_one_recorded_user(conn, _as_v4)
    # Where a concurrent build of v5 stopped: the column added, the index INVALID, the version still 4.
    conn.execute("ALTER TABLE flux.state_mutations ADD COLUMN old_row_key jsonb")
    conn.execute("CREATE INDEX state_mutations_old_row_hash_idx ON flux.state_mutations"
                 " (flux.row_hash(schema_name, table_name, old_row_key), commit_lsn, seq) WHERE old_row_key IS NOT NULL")
    conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'flux.state_mutations_old_row_hash_idx'::regclass")
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _valid(conn, "state_mutations_old_row_hash_idx") is True


def test_an_upgrade_stopped_after_its_primary_key_swap_resumes_without_rebuilding_it(conn):
    _with_one_recorded_user(conn, _as_v3)
    conn.execute("CREATE UNIQUE INDEX state_mutations_commit_lsn_seq_pkey ON flux.state_mutations (commit_lsn, seq)")
    conn.execute(schema._SWAP_PKEY)  # the version is still 3
    pkey = conn.execute("SELECT 'flux.state_mutations_pkey'::regclass::oid").fetchone()[0]
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert _constraints(conn) == {"state_mutations_pkey": "PRIMARY KEY (commit_lsn, seq)"}
    assert conn.execute("SELECT 'flux.state_mutations_pkey'::regclass::oid").fetchone()[0] == pkey
    assert "state_mutations_table_lsn_idx" not in _indexes(conn)


def test_an_upgrade_waiting_for_its_moment_of_exclusive_lock_gives_way_to_writes_between_tries(conn, dsn, monkeypatch):
    """v5's ADD COLUMN behind a long reader: a lock request that waited for good would queue every
    write of the engine behind it; a try waits LOCK_TIMEOUT, then the request is withdrawn a while."""
    monkeypatch.setattr(schema, "LOCK_TIMEOUT", "200ms")
    _with_one_recorded_user(conn, _as_v4)
    with psycopg.connect(dsn) as reading, psycopg.connect(dsn, autocommit=True) as upgrading:
        reading.execute("SELECT count(*) FROM flux.state_mutations")  # holds ACCESS SHARE until it ends
        pid = upgrading.info.backend_pid
        waits: list[bool] = []
        with ThreadPoolExecutor(1) as pool:
            upgrade = pool.submit(ensure_schema, upgrading)
            try:
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    waits.append(("AccessExclusiveLock", False) in _locks(conn, pid))
                    time.sleep(0.01)
            finally:
                reading.rollback()
            assert upgrade.result(timeout=30) is True
    assert True in waits and False in waits[waits.index(True):]  # it waited, then let go
    assert schema_version(conn) == SCHEMA_VERSION


def test_an_upgrade_that_never_gets_its_moment_of_exclusive_lock_says_what_holds_it_back(conn, dsn, monkeypatch):
    monkeypatch.setattr(schema, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(schema, "_LOCK_TRIES", 2)
    _with_one_recorded_user(conn, _as_v4)
    with psycopg.connect(dsn) as reading:
        reading.execute("SELECT count(*) FROM flux.state_mutations")
        with pytest.raises(DatabaseError) as err:
            ensure_schema(conn)
    assert err.value.retryable and "pg_stat_activity" in err.value.hint
    assert schema_version(conn) == 4
    assert ensure_schema(conn) is True  # the next start resumes


def test_an_upgrade_in_a_callers_transaction_builds_its_indexes_in_it(conn):
    _with_one_recorded_user(conn, _as_v4)
    with conn.transaction():
        assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    assert {"state_mutations_old_row_hash_idx", "state_mutations_truncate_idx"} <= _indexes(conn)


def test_a_start_waiting_for_another_starts_upgrade_says_who_it_waits_for(conn, dsn, caplog):
    """It polled the lock in silence: a start behind another's upgrade of a large log looked hung."""
    _with_one_recorded_user(conn, _as_v5)
    with psycopg.connect(dsn, autocommit=True, application_name="flux-upgrading") as upgrading, \
            psycopg.connect(dsn, autocommit=True) as starting:
        upgrading.execute(f"SELECT pg_advisory_lock({schema._LOCK})")
        holder = upgrading.info.backend_pid
        with ThreadPoolExecutor(1) as pool, caplog.at_level("WARNING", logger="flux.store"):
            start = pool.submit(ensure_schema, starting)
            try:
                deadline = time.monotonic() + 10
                while not caplog.records:
                    assert time.monotonic() < deadline, "the waiting start said nothing"
                    time.sleep(0.02)
            finally:
                upgrading.execute(f"SELECT pg_advisory_unlock({schema._LOCK})")
            assert start.result(timeout=30) is True
    message = caplog.records[0].getMessage()
    assert f"waiting for the session of pid {holder} (flux-upgrading" in message
    assert f"from v5 to v{SCHEMA_VERSION}" in message
    assert schema_version(conn) == SCHEMA_VERSION


def test_an_upgrade_through_pgbouncer_is_refused_with_a_hint_to_give_a_direct_dsn(conn, bouncer_dsn, server_hop, monkeypatch):
    """Its session lock would stay on the server connection that took it, held after the upgrade
    (the unlock runs on another), and would not keep a second upgrade out meanwhile."""
    _with_one_recorded_user(conn, _as_v5)
    migrate = schema._migrate
    monkeypatch.setattr(schema, "_migrate", lambda c, **kw: (server_hop(), migrate(c, **kw))[1])
    with psycopg.connect(bouncer_dsn, autocommit=True) as pooled:
        with pytest.raises(ConfigError, match="connection pooler") as caught:
            ensure_schema(pooled)
    assert "directly" in caught.value.hint
    assert schema_version(conn) == 5
    assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0


def test_an_upgrade_stopped_during_its_analyze_runs_it_again_at_the_next_start(conn, dsn):
    """The version was bumped before the ANALYZE: an upgrade whose connection was lost during it
    counted as done, and no start analyzed the log until autovacuum did."""
    _with_one_recorded_user(conn, _as_v6)
    with psycopg.connect(dsn) as holding, psycopg.connect(dsn, autocommit=True) as upgrading:
        # ANALYZE reads trace_requests last: it waits there, the log's steps done.
        holding.execute("LOCK TABLE flux.trace_requests IN SHARE UPDATE EXCLUSIVE MODE")
        pid = upgrading.info.backend_pid
        with ThreadPoolExecutor(1) as pool:
            upgrade = pool.submit(ensure_schema, upgrading)
            try:
                deadline = time.monotonic() + 10
                while not conn.execute("SELECT wait_event_type = 'Lock' AND query LIKE 'ANALYZE%%' FROM pg_stat_activity"
                                       " WHERE pid = %s", (pid,)).fetchone()[0]:
                    assert time.monotonic() < deadline, "the upgrade never reached its ANALYZE"
                    time.sleep(0.02)
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            finally:
                holding.rollback()
            with pytest.raises(psycopg.OperationalError):
                upgrade.result(timeout=30)
    assert schema_version(conn) == SCHEMA_VERSION - 1
    assert ensure_schema(conn) is True
    assert schema_version(conn) == SCHEMA_VERSION
    analyzed = conn.execute("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables"
                            " WHERE schemaname = 'flux' AND relname = 'trace_requests'").fetchone()[0]
    assert analyzed


def test_an_older_engines_writes_go_on_through_an_upgrade_to_v7_and_are_read_as_recorded_before_it(conn, dsn):
    """A rolling deploy: v6's engine copies rows without `relid` while a newer Flux upgrades. Its
    open transaction holds the ADD COLUMN back (a try waits LOCK_TIMEOUT, then gives way), and its
    rows after the upgrade are recorded, relid NULL as before v7."""
    from flux.cdc.assembler import COLUMNS
    v6_columns = ", ".join(c for c in COLUMNS if c != "relid")
    _with_one_recorded_user(conn, _as_v6)
    values = "\t".join({"schema_name": "public", "table_name": "users", "op": "insert", "row_key": '{"id": 8}',
                        "new": '{"id": 8}', "xid": "2", "commit_lsn": "0/200", "commit_time": "2026-01-01 00:00:00+00",
                        "seq": "0"}.get(c, "\\N") for c in COLUMNS if c != "relid") + "\n"
    with psycopg.connect(dsn) as old_engine, psycopg.connect(dsn, autocommit=True) as upgrading:
        with old_engine.cursor().copy(f"COPY flux.state_mutations ({v6_columns}) FROM STDIN") as copy:
            copy.write(values)
        with ThreadPoolExecutor(1) as pool:
            upgrade = pool.submit(ensure_schema, upgrading)
            time.sleep(0.5)
            old_engine.commit()  # its transaction ends, the upgrade goes on
            assert upgrade.result(timeout=60) is True
        with old_engine.cursor().copy(f"COPY flux.state_mutations ({v6_columns}) FROM STDIN") as copy:
            copy.write(values.replace("0/200", "0/300"))
        old_engine.commit()
    history = queries.row_history(conn, "public", "users", id_value="8")
    assert [(m.new, m.recorded_as) for m in history.mutations] == [({"id": 8}, "users"), ({"id": 8}, "users")]
    assert conn.execute("SELECT count(*) FROM flux.state_mutations WHERE relid IS NULL").fetchone()[0] == 3


@pytest.mark.parametrize("timeout", ["statement_timeout", "lock_timeout"])
def test_an_upgrade_builds_its_indexes_whatever_timeout_the_database_sets_for_applications(conn, dsn, timeout):
    """The gateway's start (flux serve) upgrades on its role's session: a build longer than such a
    timeout, or waiting that long for a transaction, was cancelled, its index left INVALID, and each
    start after failed the same way."""
    _with_one_recorded_user(conn, _as_v5)
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET {timeout} = '200ms'")
    with psycopg.connect(dsn) as writing, psycopg.connect(dsn, autocommit=True) as upgrading:
        _insert(writing, "users", 8, 0x200)  # in flight: the build waits for it longer than the timeout
        with ThreadPoolExecutor(1) as pool:
            upgrade = pool.submit(ensure_schema, upgrading)
            time.sleep(1)
            writing.commit()
            assert upgrade.result(timeout=30) is True
        assert upgrading.execute(f"SHOW {timeout}").fetchone()[0] == "200ms"  # the session's own again
    assert schema_version(conn) == SCHEMA_VERSION
    assert _valid(conn, "state_mutations_truncate_idx") is True
