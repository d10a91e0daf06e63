"""Library-level attach behaviour: table selection, publication sync, capture of tables created later."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from flux.cdc.attach import NO_TRIGGER_WARNING, PARTITION_TRUNCATE_WARNING, attach, connect, detach
from flux.cdc.autocapture import reconcile_new_tables
from flux.cdc.publication import captured_tables, published_schemas
from flux.cdc.engine import Engine, EngineConfig
from flux.cdc.status import cdc_status
from flux.errors import ConfigError, DatabaseError, LockTimeoutError, NotFoundError, PreflightError, StreamError
from flux.pg.cluster import Cluster
from flux.store.schema import SCHEMA_VERSION, ensure_schema
from tests.support import table_owner_role, wait_slot_held


def identities(conn, *names: str) -> dict[str, str]:
    rows = conn.execute("SELECT relname, relreplident FROM pg_class WHERE relname = ANY(%s)", (list(names),)).fetchall()
    return dict(rows)


def test_attach_resolves_unquoted_names_case_insensitively_via_search_path(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    assert attach(dsn, tables=["Users"]).tables == ["public.users"]


def test_attach_resolves_quoted_schema_and_table_names(dsn, conn):
    conn.execute('CREATE SCHEMA "my schema"')
    conn.execute('CREATE TABLE "my schema"."Tábla.x" (id int PRIMARY KEY)')
    assert attach(dsn, tables=['"my schema"."Tábla.x"']).tables == ["my schema.Tábla.x"]


def test_attach_refuses_the_flux_schema(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    attach(dsn, tables=["users"])
    with pytest.raises(ConfigError, match="never captures its own schema"):
        attach(dsn, tables=["flux.state_mutations"])


def test_attach_with_other_tables_updates_the_publication_and_restores_dropped_identity(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    result = attach(dsn, tables=["b"])
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.b"]
    assert "publication flux: removed public.a" in result.created
    assert identities(conn, "a", "b") == {"a": "d", "b": "f"}
    assert result.replica_identity_restored == [{"table": "public.a", "restored": "DEFAULT"}]


def test_partitions_get_full_identity_on_attach(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')")
    attach(dsn, tables=["m"])
    assert identities(conn, "m", "m1") == {"m": "f", "m1": "f"}


def test_all_tables_by_superuser_publishes_whole_schemas(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    assert published_schemas(conn, "flux") == ["public"]


def test_event_trigger_captures_table_created_later_in_its_own_transaction(dsn, conn):
    attach(dsn, all_tables=True)
    conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
    assert "public.later" in [str(t) for t in captured_tables(conn, "flux")]
    assert identities(conn, "later") == {"later": "f"}


def test_event_trigger_adds_new_schemas(dsn, conn):
    attach(dsn, all_tables=True)
    conn.execute("CREATE SCHEMA billing")
    conn.execute("CREATE TABLE billing.invoices (id int PRIMARY KEY)")
    assert "billing.invoices" in [str(t) for t in captured_tables(conn, "flux")]
    assert identities(conn, "invoices") == {"invoices": "f"}


def test_event_trigger_gives_full_identity_to_partitions_of_an_explicitly_listed_table(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    attach(dsn, tables=["m"])
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')")
    conn.execute("CREATE TABLE m2 (id int, t date NOT NULL, PRIMARY KEY (id, t))")
    conn.execute("ALTER TABLE m ATTACH PARTITION m2 FOR VALUES FROM ('2021-01-01') TO ('2022-01-01')")
    assert identities(conn, "m1", "m2") == {"m1": "f", "m2": "f"}


def test_event_trigger_gives_full_identity_to_new_partitions_of_a_listed_partition(dsn, conn):
    """Before: it looked only at the topmost table, not listed, and left them key-only until the engine's pass."""
    conn.execute("CREATE TABLE p (id int, t int, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10) PARTITION BY RANGE (id)")
    attach(dsn, tables=["p1"])
    conn.execute("CREATE TABLE p1a PARTITION OF p1 FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE TABLE p1b (id int, t int NOT NULL, PRIMARY KEY (id, t))")
    conn.execute("ALTER TABLE p1 ATTACH PARTITION p1b FOR VALUES FROM (10) TO (20)")
    assert identities(conn, "p", "p1a", "p1b") == {"p": "d", "p1a": "f", "p1b": "f"}


def test_a_partition_attached_with_its_own_partitions_then_detached_keeps_full_until_detach_restores_it(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t int, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    attach(dsn, tables=["m"])
    conn.execute("CREATE TABLE m2 (id int, t int NOT NULL, PRIMARY KEY (id, t)) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE m2a PARTITION OF m2 FOR VALUES FROM (0) TO (10)")
    conn.execute("ALTER TABLE m ATTACH PARTITION m2 FOR VALUES FROM (10) TO (20)")
    assert identities(conn, "m2", "m2a") == {"m2": "f", "m2a": "f"}
    conn.execute("ALTER TABLE m DETACH PARTITION m2")
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.m"]
    assert identities(conn, "m2", "m2a") == {"m2": "f", "m2a": "f"}
    assert {r["table"] for r in detach(dsn).restored} == {"public.m", "public.m2", "public.m2a"}
    assert identities(conn, "m", "m2", "m2a") == {"m": "d", "m2": "d", "m2a": "d"}


def test_event_trigger_leaves_tables_outside_the_capture_alone(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    assert identities(conn, "other") == {"other": "d"}
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]


def test_reconcile_without_trigger_sets_full_identity_on_new_tables_and_partitions(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    attach(dsn, all_tables=True)
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")
    conn.execute("CREATE TABLE m2 (id int, t date NOT NULL, PRIMARY KEY (id, t))")
    conn.execute("ALTER TABLE m ATTACH PARTITION m2 FOR VALUES FROM ('2021-01-01') TO ('2022-01-01')")
    conn.execute("CREATE TABLE newt (id int PRIMARY KEY)")
    conn.execute("CREATE SCHEMA extra")
    changed = reconcile_new_tables(dsn, slot="flux")
    assert set(changed) == {"REPLICA IDENTITY FULL on public.m2", "REPLICA IDENTITY FULL on public.newt", "schema extra"}
    assert identities(conn, "m2", "newt") == {"m2": "f", "newt": "f"}
    assert reconcile_new_tables(dsn, slot="flux") == []


def test_reconcile_for_non_superuser_publishes_new_tables_one_by_one(dsn, conn):
    with table_owner_role(conn, dsn, "app_owner") as app:
        try:
            with psycopg.connect(app, autocommit=True) as app_conn:
                app_conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
                result = attach(app, all_tables=True)
                assert NO_TRIGGER_WARNING in result.warnings
                app_conn.execute("CREATE TABLE public.newt (id int PRIMARY KEY)")
                assert reconcile_new_tables(app, slot="flux") == ["public.newt"]
                assert [str(t) for t in captured_tables(app_conn, "flux")] == ["public.a", "public.newt"]
                assert identities(app_conn, "newt") == {"newt": "f"}
        finally:
            detach(dsn, drop_data=True)


def test_reconcile_does_nothing_for_an_explicit_table_list(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    assert reconcile_new_tables(dsn, slot="flux") == []


def test_event_trigger_captures_again_a_listed_table_created_again_in_its_own_transaction(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    with psycopg.connect(dsn) as c:
        c.execute("DROP TABLE a")
        c.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
        assert [str(t) for t in captured_tables(c, "flux")] == ["public.a"]
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")  # never listed: left alone
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]
    assert identities(conn, "a", "other") == {"a": "f", "other": "d"}


def test_event_trigger_captures_again_a_listed_table_replaced_by_a_rename(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE a_new (id bigint PRIMARY KEY)")
    conn.execute("ALTER TABLE a RENAME TO a_old")
    conn.execute("ALTER TABLE a_new RENAME TO a")
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a", "public.a_old"]
    conn.execute("ALTER TABLE a REPLICA IDENTITY DEFAULT")  # a user's change to a captured table stays theirs
    assert identities(conn, "a") == {"a": "d"}


def test_attach_brings_an_older_event_trigger_function_up_to_date(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE OR REPLACE FUNCTION flux.capture_new_tables() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END'")
    attach(dsn, tables=["a"])
    conn.execute("DROP TABLE a")
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]


def test_reconcile_captures_again_a_listed_table_that_was_dropped_and_created_again(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")  # as for a role that cannot own one
    conn.execute("DROP TABLE a")
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    conn.execute("DROP TABLE other")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")  # never listed: left alone
    assert reconcile_new_tables(dsn, slot="flux") == ["public.a"]
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]
    assert identities(conn, "a", "other") == {"a": "f", "other": "d"}
    assert reconcile_new_tables(dsn, slot="flux") == []


def test_reconcile_captures_again_a_listed_table_replaced_by_a_rename(dsn, conn):
    # The swap of an online schema change: a copy built beside the table takes its name.
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")
    conn.execute("CREATE TABLE a_new (id bigint PRIMARY KEY)")
    conn.execute("ALTER TABLE a RENAME TO a_old")
    conn.execute("ALTER TABLE a_new RENAME TO a")
    conn.execute("DROP TABLE a_old")
    assert reconcile_new_tables(dsn, slot="flux") == ["public.a"]
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]


def test_detach_forgets_the_listed_tables(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    detach(dsn)
    assert conn.execute("SELECT key FROM flux.meta WHERE key LIKE 'listed_tables:%'").fetchall() == []


def test_application_role_can_still_create_tables_under_the_event_trigger(dsn, conn):
    attach(dsn, all_tables=True)
    conn.execute("CREATE ROLE app_user LOGIN")
    conn.execute("GRANT CREATE ON SCHEMA public TO app_user")
    try:
        with psycopg.connect(dsn.replace("postgres@", "app_user@"), autocommit=True) as app_conn:
            app_conn.execute("CREATE TABLE public.made_by_app (id int PRIMARY KEY)")
        assert "public.made_by_app" in [str(t) for t in captured_tables(conn, "flux")]
        assert identities(conn, "made_by_app") == {"made_by_app": "f"}
    finally:
        conn.execute("DROP TABLE IF EXISTS public.made_by_app")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM app_user")
        conn.execute("DROP ROLE app_user")


def test_attach_refuses_an_unlogged_table_with_the_statement_that_makes_it_capturable(dsn, conn):
    conn.execute("CREATE UNLOGGED TABLE cache (id int PRIMARY KEY)")
    with pytest.raises(ConfigError, match="public.cache is UNLOGGED") as caught:
        attach(dsn, tables=["cache"])
    assert caught.value.hint == 'ALTER TABLE "public"."cache" SET LOGGED, or leave it out of --tables.'


def test_the_connection_of_attach_detach_and_status_through_pgbouncer_prepares_nothing(bouncer_dsn, server_hop):
    """psycopg prepares a statement at its fifth run (attach looks up each table's partitions, one
    statement per table); the next transaction, on another server connection, did not find it."""
    with connect(bouncer_dsn) as conn:
        for _ in range(8):
            assert conn.execute("SELECT 1").fetchone() == (1,)
            server_hop()


def test_attach_to_a_read_only_session_says_so_before_changing_anything(dsn, conn):
    """It failed at its first write, 'Attach failed: cannot execute CREATE SCHEMA in a read-only
    transaction', with no hint (a standby answers the same)."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET default_transaction_read_only = on")
    with pytest.raises(PreflightError) as raised:
        attach(dsn, tables=["orders"])
    assert raised.value.message.startswith("Flux's session is read-only: default_transaction_read_only is on")
    assert "ALTER ROLE" in raised.value.hint and "default_transaction_read_only = off" in raised.value.hint
    assert raised.value.exit_code == 4


def test_attach_to_a_standby_says_to_attach_the_primary(tmp_path_factory, pg_cluster):
    """A standby read the same as a read-only session: it failed at its first write."""
    from tests.conftest import TEST_SETTINGS

    state = tmp_path_factory.mktemp("standby")
    state.chmod(0o755)
    cluster = Cluster(state_dir=state, settings=TEST_SETTINGS)
    primary = cluster.start()
    data_dir = Path(primary.data_dir)
    try:
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        cluster.stop()
        signal = data_dir / "standby.signal"  # in recovery from its start: a standby that waits for WAL
        signal.touch()
        os.chown(signal, data_dir.stat().st_uid, data_dir.stat().st_gid)
        info = cluster.start()
        with pytest.raises(PreflightError) as raised:
            attach(info.dsn, tables=["orders"])
    finally:
        cluster.destroy()
    assert raised.value.message == "This server is a standby (in recovery), where nothing can be written"
    assert raised.value.hint.startswith("Attach the primary")


def test_attach_refuses_a_publication_flux_did_not_make(dsn, conn):
    """Taking it over would change what another tool publishes."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
    conn.execute("CREATE PUBLICATION flux FOR TABLE other WITH (publish = 'insert')")
    with pytest.raises(PreflightError, match="publication named flux exists, and Flux did not make it"):
        attach(dsn, tables=["t"])
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.other"]


def test_attach_refuses_a_slot_flux_did_not_make(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    conn.execute("SELECT pg_create_logical_replication_slot('flux', 'test_decoding')")
    with pytest.raises(PreflightError, match="replication slot named flux exists .*plugin test_decoding"):
        attach(dsn, tables=["t"])


def test_attach_refuses_a_second_attachment_in_the_same_database(dsn, conn):
    """Two slots would record each change twice."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    with pytest.raises(PreflightError, match="already attached, through slot flux"):
        attach(dsn, tables=["t"], slot="second", publication="second")


def test_detach_while_an_engine_reads_the_slot_names_the_engines_pid_not_the_walsenders(dsn, conn, capture):
    """The slot's active_pid is the server's walsender: a user who kills that pid kills a backend."""
    import os
    import socket

    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    capture(tables=["t"])
    wait_slot_held(conn)
    with pytest.raises(PreflightError) as caught:
        detach(dsn)
    assert f"A Flux engine (pid {os.getpid()} on {socket.gethostname()})" in caught.value.message


def test_attach_where_the_servers_slot_is_another_databases_says_whose_and_how_to_get_one(dsn, pg_info):
    with psycopg.connect(pg_info.dsn, autocommit=True) as admin:  # the cluster's own database, not the test's
        admin.execute("SELECT pg_create_logical_replication_slot('flux', 'pgoutput')")
        try:
            with pytest.raises(PreflightError) as caught:
                attach(dsn, all_tables=True)
        finally:
            admin.execute("SELECT pg_drop_replication_slot('flux')")
    assert "slot flux is database postgres's" in caught.value.message and "--slot NAME" in caught.value.hint


def test_detach_refuses_a_newer_schema_and_changes_nothing(dsn, conn):
    """It undid what this release knows of a newer one's attachment (and --drop-data took a table a
    newer release added for an application's)."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    conn.execute("UPDATE flux.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    for drop_data in (False, True):
        with pytest.raises(ConfigError, match="newer than this Flux"):
            detach(dsn, drop_data=drop_data)
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 1
    assert conn.execute("SELECT relreplident FROM pg_class WHERE oid = 'public.t'::regclass").fetchone()[0] == "f"


def test_detach_leaves_a_slot_flux_did_not_make(dsn, conn):
    conn.execute("SELECT pg_create_logical_replication_slot('tool', 'test_decoding')")
    with pytest.raises(NotFoundError, match="No Flux attachment uses slot tool"):
        detach(dsn, slot="tool")
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tool'").fetchone()[0] == 1


def test_attach_widens_its_own_publication_back_to_every_operation(dsn, conn):
    """A publication narrowed to inserts would drop updates, deletes and truncates without a word."""
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    conn.execute("ALTER PUBLICATION flux SET (publish = 'insert')")
    result = attach(dsn, tables=["t"])
    assert "publication flux: publish = insert, update, delete, truncate" in result.created
    flags = conn.execute("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = 'flux'").fetchone()
    assert flags == (True, True, True, True)


def test_attach_says_a_truncate_of_one_partition_is_not_recorded(dsn, conn):
    """pgoutput leaves it out when it publishes through the partitioned table."""
    conn.execute("CREATE TABLE parted (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE plain (id int PRIMARY KEY)")
    warnings = attach(dsn, tables=["parted", "plain"]).warnings
    assert [w for w in warnings if "partition" in w] == [PARTITION_TRUNCATE_WARNING.format(table="public.parted")]


def test_attach_says_it_of_many_partitioned_tables_in_one_warning(dsn, conn):
    """One warning each: a database of hundreds of partitioned tables got hundreds of lines at every attach."""
    for i in range(12):
        conn.execute(f"CREATE TABLE parted{i:02} (id int, region text) PARTITION BY LIST (region)")
        conn.execute(f"CREATE TABLE parted{i:02}_eu PARTITION OF parted{i:02} FOR VALUES IN ('eu')")
    warnings = [w for w in attach(dsn, all_tables=True).warnings if "partition" in w]
    assert warnings == [f"12 captured tables are partitioned ({', '.join(f'public.parted{i:02}' for i in range(10))} and 2 "
                        "more): a TRUNCATE of one of their partitions is not recorded (PostgreSQL's pgoutput leaves it out); "
                        "a TRUNCATE of the partitioned table itself, and DELETEs, are."]


def test_narrowing_all_tables_to_a_list_restores_the_identity_of_the_tables_left_out(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    assert identities(conn, "a", "b") == {"a": "f", "b": "f"}
    narrowed = attach(dsn, tables=["a"])
    assert identities(conn, "a", "b") == {"a": "f", "b": "d"}
    assert [str(t) for t in captured_tables(conn, "flux")] == ["public.a"]
    # Before: restored without a word (only "removed schema public" was said).
    assert narrowed.replica_identity_restored == [{"table": "public.b", "restored": "DEFAULT"}]


@pytest.fixture
def copy_of_attached(dsn, conn):
    """A second database holding an attachment's rows whose slot belongs to the first, as a copy made
    with CREATE DATABASE ... TEMPLATE holds them; yields its DSN."""
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    attach(dsn, tables=["users"])
    conn.execute("CREATE DATABASE attached_copy")
    copy_dsn = dsn.rsplit("/", 1)[0] + "/attached_copy"
    try:
        with psycopg.connect(copy_dsn, autocommit=True) as copy:
            ensure_schema(copy)
            copy.execute("INSERT INTO flux.attachments (slot_name, publication_name, all_tables) VALUES ('flux', 'flux', false)")
        yield copy_dsn
    finally:
        conn.execute("DROP DATABASE attached_copy")


def test_detach_in_a_copy_leaves_the_original_databases_slot(conn, copy_of_attached):
    result = detach(copy_of_attached)
    assert conn.execute("SELECT database FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone() == (conn.info.dbname,)
    assert not any("slot" in dropped for dropped in result.dropped)
    assert [w for w in result.warnings if f"belongs to database {conn.info.dbname}" in w]


def test_status_in_a_copy_says_the_slot_is_another_databases(conn, copy_of_attached):
    status = cdc_status(copy_of_attached)
    assert status.slot_exists is False
    assert [w for w in status.warnings if f"Slot 'flux' belongs to database {conn.info.dbname}, not attached_copy" in w]
    assert not [w for w in status.warnings if "Publication" in w]  # replacing the slot is not the fix here


def test_attach_creating_a_slot_forgets_progress_recorded_for_an_earlier_one(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    attach(dsn, tables=["users"])
    conn.execute("INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn) VALUES ('flux', 'FF/0', 'FF/10')")
    conn.execute("SELECT pg_drop_replication_slot('flux')")  # as on a server the database was restored to
    attach(dsn, tables=["users"])
    assert conn.execute("SELECT count(*) FROM flux.cdc_progress WHERE slot_name = 'flux'").fetchone() == (0,)


def test_the_engine_refuses_progress_ahead_of_the_servers_wal(dsn, conn):
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    attach(dsn, tables=["users"])
    conn.execute("INSERT INTO flux.cdc_progress (slot_name, commit_lsn, end_lsn) VALUES ('flux', 'FF/0', 'FF/10')")
    with pytest.raises(StreamError) as caught:
        Engine(EngineConfig(dsn=dsn)).run(install_signal_handlers=False)
    assert "ahead of this server's WAL" in str(caught.value) and "flux detach --slot flux" in caught.value.hint


def test_detach_as_a_role_refused_one_step_changes_nothing(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    conn.execute("CREATE ROLE detach_repl LOGIN REPLICATION")
    try:
        conn.execute("GRANT USAGE ON SCHEMA flux TO detach_repl; GRANT SELECT ON ALL TABLES IN SCHEMA flux TO detach_repl")
        conn.execute("ALTER TABLE t OWNER TO detach_repl")
        with pytest.raises(DatabaseError) as raised:  # not the publication's owner
            detach(dsn.replace("postgres@", "detach_repl@"))
    finally:
        conn.execute("REASSIGN OWNED BY detach_repl TO postgres")
        conn.execute("DROP OWNED BY detach_repl")
        conn.execute("DROP ROLE detach_repl")
    # Before: the slot was dropped first, and the attachment left without it.
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'flux'").fetchone() == (1,)
    assert identities(conn, "t") == {"t": "f"}
    assert "must be owner of publication flux" in raised.value.message and "nothing was changed" in raised.value.hint
    assert detach(dsn).restored == [{"table": "public.t", "restored": "DEFAULT"}]


def test_detach_as_a_role_that_no_longer_owns_a_table_names_it_with_the_grant_and_changes_nothing(dsn, conn):
    """Before: PostgreSQL's 'must be owner of table b', with a hint to run detach as the role that ran
    attach, which it was."""
    conn.execute("CREATE ROLE b_owner")
    try:
        with table_owner_role(conn, dsn, "app_attach") as app:
            with psycopg.connect(app, autocommit=True) as app_conn:
                app_conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
                app_conn.execute("CREATE TABLE public.b (id int PRIMARY KEY)")
                attach(app, tables=["a", "b"])
                conn.execute("ALTER TABLE b OWNER TO b_owner")  # a DBA's change while attached
                with pytest.raises(PreflightError) as refused:
                    detach(app)
                assert refused.value.message == ("Role 'app_attach' needs to own the tables whose replica identity detach "
                                                 "restores, and does not own: public.b (owner b_owner)")
                assert refused.value.hint.startswith('As a superuser run: GRANT "b_owner" TO "app_attach";')
                assert identities(conn, "a", "b") == {"a": "f", "b": "f"}
                conn.execute("GRANT b_owner TO app_attach")
                assert [r["table"] for r in detach(app).restored] == ["public.a", "public.b"]
    finally:
        conn.execute("DROP OWNED BY b_owner")
        conn.execute("DROP ROLE b_owner")


def test_reconcile_as_a_role_without_usage_on_the_captured_schemas_does_not_fail(dsn, conn):
    conn.execute("CREATE SCHEMA shop")
    conn.execute("CREATE TABLE shop.m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    attach(dsn, tables=["shop.m"])
    conn.execute("CREATE ROLE engine_only_flux LOGIN REPLICATION")
    try:
        # What of the flux schema reconcile reads (the engine's start check requires these and more).
        conn.execute("GRANT USAGE ON SCHEMA flux TO engine_only_flux;"
                     " GRANT SELECT ON flux.attachments, flux.meta TO engine_only_flux")
        # Before: the names of captured tables were cast to regclass, which needs USAGE on their
        # schema, and the engine stopped at its first idle check for new tables.
        assert reconcile_new_tables(dsn.replace("postgres@", "engine_only_flux@"), slot="flux") == []
    finally:
        conn.execute("DROP OWNED BY engine_only_flux")
        conn.execute("DROP ROLE engine_only_flux")


def test_attach_without_create_names_the_database_in_its_grant(dsn, conn):
    conn.execute("CREATE ROLE attach_nocreate LOGIN REPLICATION")
    try:
        with pytest.raises(PreflightError) as raised:
            attach(dsn.replace("postgres@", "attach_nocreate@"), all_tables=True)
    finally:
        conn.execute("DROP ROLE attach_nocreate")
    assert raised.value.hint == f'As the database owner run: GRANT CREATE ON DATABASE "{conn.info.dbname}" TO "attach_nocreate";'


def test_a_table_reconcile_may_not_capture_is_warned_of_once_with_the_fix_not_every_pass(dsn, conn, caplog):
    table = f"not_ours_{uuid.uuid4().hex[:8]}"  # warnings are remembered per process, by table
    with table_owner_role(conn, dsn, "app_owner") as app:
        try:
            with psycopg.connect(app, autocommit=True) as app_conn:
                app_conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
                attach(app, all_tables=True)
            conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY)")  # the superuser's
            with caplog.at_level("WARNING", logger="flux.cdc"):
                for _ in range(3):
                    assert reconcile_new_tables(app, slot="flux") == []
        finally:
            detach(dsn, drop_data=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cannot capture public.{table} yet: must be owner of table {table}")
    assert "otherwise run `flux attach` again" in warnings[0]


def nothing_of_fluxs(conn) -> tuple:
    """What a refused attach must not leave behind: slots, publications, Flux's tables, the event trigger."""
    return (conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").fetchone()[0],
            conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0],
            conn.execute("SELECT to_regclass('flux.state_mutations')").fetchone()[0],
            conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0])


def test_attach_refuses_an_application_schema_named_flux_and_leaves_it_as_it_was(dsn, conn):
    """Before: Flux created its tables among the application's, and `detach --drop-data` dropped them all."""
    conn.execute("CREATE SCHEMA flux")
    conn.execute("CREATE TABLE flux.jobs (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    with pytest.raises(PreflightError) as refused:
        attach(dsn, tables=["users"])
    assert "schema named flux (owner postgres, 1 object(s)) that is not Flux's" in refused.value.message
    assert "ALTER SCHEMA flux RENAME TO" in refused.value.hint
    assert nothing_of_fluxs(conn) == (0, 0, None, 0)
    assert conn.execute("SELECT relname FROM pg_class WHERE relnamespace = 'flux'::regnamespace AND relkind = 'r'").fetchall() == [("jobs",)]


def identity_by_index(conn, table: str, index: str) -> None:
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, u int NOT NULL)")
    conn.execute(f"CREATE UNIQUE INDEX {index} ON {table} (u)")
    conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY USING INDEX {index}")


def test_detach_leaves_full_a_table_whose_index_of_before_attach_is_gone_and_says_so(dsn, conn):
    """Before: ALTER TABLE ... USING INDEX of a dropped index failed the whole detach, every time."""
    identity_by_index(conn, "a", "a_u_idx")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, tables=["a", "b"])
    conn.execute("DROP INDEX a_u_idx")
    result = detach(dsn)
    assert result.restored == [{"table": "public.b", "restored": "DEFAULT"}]
    [warning] = result.warnings
    assert warning.startswith("public.a: left REPLICA IDENTITY FULL: before attach it was USING INDEX a_u_idx, and that index")
    assert warning.endswith('ALTER TABLE "public"."a" REPLICA IDENTITY DEFAULT;')
    assert identities(conn, "a", "b") == {"a": "f", "b": "d"}
    assert nothing_of_fluxs(conn)[:2] == (0, 0)


def test_detach_of_a_listed_table_created_again_restores_the_identity_the_new_table_had(dsn, conn):
    identity_by_index(conn, "a", "a_u_idx")
    attach(dsn, tables=["a"])
    conn.execute("DROP TABLE a")
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")  # captured again by the event trigger
    assert identities(conn, "a") == {"a": "f"}
    assert detach(dsn).restored == [{"table": "public.a", "restored": "DEFAULT"}]
    assert identities(conn, "a") == {"a": "d"}


def test_detach_restores_the_identity_of_a_table_renamed_or_moved_to_another_schema_while_attached(dsn, conn):
    """Before: the records were by name, so detach found neither and both stayed FULL, costing WAL for good."""
    identity_by_index(conn, "a", "a_u_idx")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    conn.execute("CREATE SCHEMA archive")
    attach(dsn, tables=["a", "b"])
    conn.execute("ALTER TABLE a RENAME TO a2")
    conn.execute("ALTER TABLE b SET SCHEMA archive")
    assert detach(dsn).restored == [{"table": "archive.b", "restored": "DEFAULT"},
                                    {"table": "public.a2", "restored": "USING INDEX a_u_idx"}]
    assert identities(conn, "a2", "b") == {"a2": "i", "b": "d"}


def test_detach_after_a_listed_table_was_swapped_for_a_copy_restores_both(dsn, conn):
    """Before: the copy's record, under the same name, took the place of the original's, which stayed FULL."""
    identity_by_index(conn, "a", "a_u_idx")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE a_new (id bigint PRIMARY KEY)")
    conn.execute("ALTER TABLE a RENAME TO a_old")
    conn.execute("ALTER TABLE a_new RENAME TO a")  # captured again by the event trigger
    assert identities(conn, "a", "a_old") == {"a": "f", "a_old": "f"}
    assert detach(dsn).restored == [{"table": "public.a", "restored": "DEFAULT"},
                                    {"table": "public.a_old", "restored": "USING INDEX a_u_idx"}]


def test_detach_in_a_database_restored_from_a_dump_restores_by_the_recorded_names_not_the_originals_oids(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE c (id int PRIMARY KEY)")
    conn.execute("ALTER TABLE c REPLICA IDENTITY FULL")  # FULL before attach, as the team chose
    attach(dsn, tables=["a", "c"])
    # As a restore leaves it: the log has a new oid, and the original's oid of a is c's here.
    conn.execute("UPDATE flux.meta SET value = jsonb_set(value, '{log}', '0') WHERE key = 'relids'")
    conn.execute("UPDATE flux.replica_identity_changes SET relid = 'c'::regclass")
    assert detach(dsn).restored == [{"table": "public.a", "restored": "DEFAULT"}]
    assert identities(conn, "a", "c") == {"a": "d", "c": "f"}


def test_detach_upgrades_an_older_schema_first(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("ALTER TABLE flux.replica_identity_changes DROP COLUMN relid,"
                 " ADD PRIMARY KEY (slot_name, schema_name, table_name)")
    conn.execute("UPDATE flux.meta SET value = '7' WHERE key = 'schema_version'")
    assert detach(dsn).restored == [{"table": "public.a", "restored": "DEFAULT"}]
    assert identities(conn, "a") == {"a": "d"}


def test_detach_leaves_a_replica_identity_changed_by_hand_since_attach_and_says_so(dsn, conn):
    identity_by_index(conn, "a", "a_u_idx")
    attach(dsn, tables=["a"])
    conn.execute("ALTER TABLE a REPLICA IDENTITY DEFAULT")  # the team's choice, made while attached
    result = detach(dsn)
    assert result.restored == [] and identities(conn, "a") == {"a": "d"}
    assert result.warnings == ["public.a: REPLICA IDENTITY was changed to DEFAULT since Flux set FULL; left as it is "
                               "(before attach it was USING INDEX a_u_idx)."]


def test_attach_again_after_a_hand_change_says_what_detach_then_restores(dsn, conn):
    """Before: attach said detach restores the hand-set identity, and detach restored the one of before."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY, u int NOT NULL)")
    conn.execute("CREATE UNIQUE INDEX a_u_idx ON a (u)")
    attach(dsn, tables=["a"])
    conn.execute("ALTER TABLE a REPLICA IDENTITY USING INDEX a_u_idx")
    [change] = attach(dsn, tables=["a"]).replica_identity_changed
    assert change["previous"] == "USING INDEX a_u_idx"
    assert detach(dsn).restored == [{"table": "public.a", "restored": change["previous"]}]
    assert identities(conn, "a") == {"a": "i"}


def test_attach_names_everything_its_role_lacks_at_once_with_each_statement_and_changes_nothing(dsn, conn):
    """Before: one refusal at a time, and for tables of several owners a GRANT of the first owner "TO ..."."""
    conn.execute("CREATE ROLE attach_bare LOGIN; CREATE ROLE owner_one; CREATE ROLE owner_two")
    try:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY); ALTER TABLE a OWNER TO owner_one")
        conn.execute("CREATE TABLE b (id int PRIMARY KEY); ALTER TABLE b OWNER TO owner_two")
        with pytest.raises(PreflightError) as refused:
            attach(dsn.replace("postgres@", "attach_bare@"), tables=["a", "b"])
    finally:
        conn.execute("DROP TABLE IF EXISTS a, b")
        conn.execute("DROP ROLE attach_bare; DROP ROLE owner_one; DROP ROLE owner_two")
    assert refused.value.message == (
        "Role 'attach_bare' may not use replication; it may not create schemas or publications in this database; it needs "
        "to own the tables it captures (to set REPLICA IDENTITY and publish them), and does not own: public.a (owner "
        "owner_one), public.b (owner owner_two)")
    assert refused.value.hint == (
        'As a superuser run: ALTER ROLE "attach_bare" WITH REPLICATION; '
        f'As the database owner run: GRANT CREATE ON DATABASE "{conn.info.dbname}" TO "attach_bare"; '
        'As a superuser run: GRANT "owner_one", "owner_two" TO "attach_bare"; (membership gives it everything those roles '
        'own). Or attach as the owner, or leave these tables out (--tables).')
    assert nothing_of_fluxs(conn) == (0, 0, None, 0)


def test_attach_names_a_partition_its_role_does_not_own_before_changing_anything(dsn, conn):
    """Before: `must be owner of table m1` mid-transaction, with a hint about reading Flux's tables."""
    conn.execute("CREATE ROLE attach_parts LOGIN REPLICATION; CREATE ROLE parts_owner")
    try:
        conn.execute(f'GRANT CREATE ON DATABASE "{conn.info.dbname}" TO attach_parts')
        conn.execute("CREATE TABLE m (id int, t int, PRIMARY KEY (id, t)) PARTITION BY RANGE (t); ALTER TABLE m OWNER TO attach_parts")
        conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10); ALTER TABLE m1 OWNER TO parts_owner")
        with pytest.raises(PreflightError) as refused:
            attach(dsn.replace("postgres@", "attach_parts@"), tables=["m"])
    finally:
        conn.execute("DROP TABLE IF EXISTS m")
        conn.execute(f'REVOKE CREATE ON DATABASE "{conn.info.dbname}" FROM attach_parts')
        conn.execute("DROP ROLE attach_parts; DROP ROLE parts_owner")
    assert refused.value.message.endswith("does not own: public.m1 (owner parts_owner)")
    assert refused.value.hint.startswith('As a superuser run: GRANT "parts_owner" TO "attach_parts";')
    assert nothing_of_fluxs(conn) == (0, 0, None, 0)


def test_detach_drop_data_refuses_while_the_flux_schema_holds_an_applications_table(dsn, conn):
    """A role named flux creates its unqualified tables in Flux's schema: DROP SCHEMA flux CASCADE dropped them."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE flux.invoices (id int PRIMARY KEY)")
    with pytest.raises(PreflightError) as refused:
        detach(dsn, drop_data=True)
    assert refused.value.message.endswith("which --drop-data would drop with it: flux.invoices")
    assert "ALTER TABLE flux.invoices SET SCHEMA public;" in refused.value.hint and "Nothing was changed" in refused.value.hint
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone() == (1,)
    conn.execute("ALTER TABLE flux.invoices SET SCHEMA public")
    assert detach(dsn, drop_data=True).data_dropped
    assert conn.execute("SELECT to_regclass('public.invoices') IS NOT NULL").fetchone() == (True,)


def test_attach_warns_that_a_role_named_flux_would_find_fluxs_schema_first(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE ROLE flux")  # roles are per cluster: dropped at once below
    try:
        warned = [w for w in attach(dsn, tables=["a"]).warnings if "A role named flux" in w]
        conn.execute("ALTER ROLE flux SET search_path = public")
        fixed = [w for w in attach(dsn, tables=["a"]).warnings if "A role named flux" in w]
    finally:
        conn.execute("DROP ROLE flux")
    assert len(warned) == 1 and warned[0].endswith("Run: ALTER ROLE flux SET search_path = public;")
    assert 'its search_path ("$user", public)' in warned[0]
    assert fixed == []


def test_all_tables_as_a_non_superuser_leaves_an_extensions_own_table_out(dsn, conn):
    """PostGIS's spatial_ref_sys, owned by whoever installed it: before, `--all-tables` was refused for it,
    with a hint to grant the attaching role membership in that (often superuser) role."""
    conn.execute("CREATE TABLE ext_table (srid int PRIMARY KEY)")
    conn.execute("ALTER EXTENSION plpgsql ADD TABLE ext_table")  # as an extension's script makes it its own
    with table_owner_role(conn, dsn, "ext_app_owner") as app:
        try:
            with psycopg.connect(app, autocommit=True) as app_conn:
                app_conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
            assert attach(app, all_tables=True).tables == ["public.a"]
            assert not [w for w in cdc_status(dsn).warnings if "not captured" in w]
            assert reconcile_new_tables(app, slot="flux") == []
        finally:
            detach(dsn, drop_data=True)
            conn.execute("ALTER EXTENSION plpgsql DROP TABLE ext_table")
    assert identities(conn, "ext_table") == {"ext_table": "d"}


@pytest.fixture
def publication_dropped(dsn, conn):
    """An attachment whose publication was dropped by hand, with a change made meanwhile."""
    conn.execute("CREATE TABLE users (id int PRIMARY KEY)")
    attach(dsn, tables=["users"])
    conn.execute("DROP PUBLICATION flux")
    conn.execute("INSERT INTO users VALUES (1)")
    return dsn


def test_the_engine_stops_with_the_fix_when_its_publication_was_dropped(publication_dropped):
    """Before: 'Replication connection lost', retried and logged twice a second, for good."""
    from tests.support import start_engine

    running = start_engine(publication_dropped, backoff_initial=0.1)
    running.thread.join(timeout=15)
    assert not running.thread.is_alive(), "the engine kept retrying a change it can never decode"
    [error] = running.errors
    assert isinstance(error, NotFoundError) and 'publication "flux" does not exist' in error.message
    assert "`flux attach` again replaces the slot" in error.hint


def test_status_says_the_publication_is_missing_and_nothing_is_captured(publication_dropped):
    status = cdc_status(publication_dropped)
    assert status.publication_exists is False
    assert [w for w in status.warnings if w.startswith("Publication 'flux' does not exist (dropped by hand?)")]
    assert not [w for w in status.warnings if "created again" in w]  # before: the table was blamed


def test_attach_again_after_the_publication_was_dropped_replaces_the_slot_and_captures_again(publication_dropped, conn):
    """Before: attach made the publication again and kept the slot, which failed on the change made meanwhile."""
    from tests.support import mutations, start_engine

    created = attach(publication_dropped, tables=["users"]).created
    assert "replication slot flux (replaces the old one: its publication flux had been dropped, and it cannot decode a " \
           "change made meanwhile)" in created
    running = start_engine(publication_dropped)
    try:
        conn.execute("INSERT INTO users VALUES (2)")
        running.caught_up()
    finally:
        running.stop()
    assert [m["new"] for m in mutations(publication_dropped)] == [{"id": 2}]


def test_attach_refuses_to_replace_a_slot_without_its_publication_while_it_is_read(publication_dropped, conn):
    from flux.cdc.stream import ReplicationStream

    # Streaming from the server's position, past the change the slot cannot decode: it stays held.
    now = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    holder = ReplicationStream(dsn=publication_dropped, slot="flux", publication="flux", start_lsn=int(now))
    holder.open()
    try:
        wait_slot_held(conn)
        with pytest.raises(PreflightError, match="Publication flux was dropped, and a consumer still reads slot flux"):
            attach(publication_dropped, tables=["users"])
    finally:
        holder.close()
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def test_attach_again_through_another_publication_is_refused_rather_than_leaving_the_first_behind(dsn, conn):
    """Before: a second publication was made and recorded, and the first stayed, published, past detach."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"], publication="first")
    with pytest.raises(ConfigError, match="Slot flux's attachment publishes through first, not other") as refused:
        attach(dsn, tables=["a"], publication="other")
    assert "`flux detach --slot flux` first" in refused.value.hint
    assert attach(dsn, tables=["a"]).publication == "first"  # without --publication: the recorded one
    detach(dsn)
    assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def test_detach_after_the_flux_schema_was_dropped_by_hand_says_the_slot_still_keeps_wal(dsn, conn):
    """Before: "nothing of Flux's to detach here", while the slot it left pinned WAL."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("DROP SCHEMA flux CASCADE")
    with pytest.raises(NotFoundError) as refused:
        detach(dsn)
    assert "keeps WAL until it is dropped" in refused.value.hint and "SELECT pg_drop_replication_slot('flux');" in refused.value.hint
    assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone() == (1,)  # left alone


def test_attach_asks_to_change_the_owner_of_a_superusers_table_rather_than_grant_the_superuser_role(dsn, conn):
    """Membership in a superuser role makes a role able to act as a superuser."""
    conn.execute("CREATE ROLE attach_nosuper LOGIN REPLICATION")
    try:
        conn.execute(f'GRANT CREATE ON DATABASE "{conn.info.dbname}" TO attach_nosuper')
        conn.execute("CREATE TABLE dba_table (id int PRIMARY KEY)")  # the superuser's
        with pytest.raises(PreflightError) as refused:
            attach(dsn.replace("postgres@", "attach_nosuper@"), tables=["dba_table"])
    finally:
        conn.execute(f'REVOKE CREATE ON DATABASE "{conn.info.dbname}" FROM attach_nosuper')
        conn.execute("DROP ROLE attach_nosuper")
    assert refused.value.hint == ('As a superuser run: ALTER TABLE "public"."dba_table" OWNER TO "attach_nosuper"; Or attach '
                                  'as the owner, or leave these tables out (--tables).')


def test_a_partitioned_table_left_out_of_the_list_gets_back_its_partitions_identities_too(dsn, conn):
    """Only the partitioned table itself was restored: its partitions stayed FULL until detach."""
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    conn.execute("CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
    attach(dsn, tables=["a", "m"])
    narrowed = attach(dsn, tables=["a"])
    assert identities(conn, "a", "m", "m1") == {"a": "f", "m": "d", "m1": "d"}
    assert narrowed.replica_identity_restored == [{"table": "public.m", "restored": "DEFAULT"},
                                                  {"table": "public.m1", "restored": "DEFAULT"}]


def test_a_partition_listed_by_itself_stays_full_when_its_partitioned_table_is_listed_instead(dsn, conn):
    """The partition, leaving the publication by name, was restored and set FULL again in the same run:
    reported restored, though still FULL and captured through its root."""
    conn.execute("CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10)")
    attach(dsn, tables=["m1"])
    widened = attach(dsn, tables=["m"])
    assert identities(conn, "m", "m1") == {"m": "f", "m1": "f"}
    assert widened.replica_identity_restored == []


def test_attach_of_a_partitioned_table_listed_with_its_partition_sets_each_full_once(dsn, conn):
    """The partition came twice into one INSERT of the records: 'ON CONFLICT DO UPDATE command cannot affect row a
    second time', and attach failed."""
    conn.execute("CREATE TABLE p (id int PRIMARY KEY) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    result = attach(dsn, tables=["p", "p1"])
    assert sorted(change["table"] for change in result.replica_identity_changed) == ["public.p", "public.p1"]
    assert identities(conn, "p", "p1") == {"p": "f", "p1": "f"}
    assert sorted(item["table"] for item in detach(dsn).restored) == ["public.p", "public.p1"]
    assert identities(conn, "p", "p1") == {"p": "d", "p1": "d"}


# A server whose shared lock table holds about 160 locks (10 per backend slot, 16 slots), so that a
# few hundred tables are more than one transaction may lock: 'out of shared memory' at about 260.
SMALL_LOCK_TABLE = {"max_locks_per_transaction": "10", "max_connections": "10", "max_worker_processes": "2",
                    "max_wal_senders": "2", "autovacuum_max_workers": "1", "max_prepared_transactions": "0"}
MANY_TABLES = 400


@pytest.fixture(scope="module")
def small_lock_table(tmp_path_factory):
    """The admin DSN of a cluster with a small lock table."""
    from tests.conftest import TEST_SETTINGS

    state = tmp_path_factory.mktemp("small-lock-table")
    state.chmod(0o755)
    cluster = Cluster(state_dir=state, settings={**TEST_SETTINGS, **SMALL_LOCK_TABLE})
    yield cluster.start().dsn
    cluster.destroy()


@pytest.fixture
def small_lock_db(small_lock_table):
    """The DSN of a fresh database on the small-lock-table cluster, dropped with its slots after."""
    dbname = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(small_lock_table, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {dbname}")
    yield small_lock_table.rsplit("/", 1)[0] + f"/{dbname}"
    _drop_slots(small_lock_table, dbname)
    with psycopg.connect(small_lock_table, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {dbname} WITH (FORCE)")


@pytest.fixture
def many_tables(small_lock_table, small_lock_db):
    """A database of MANY_TABLES tables (two partitioned in two) owned by a role that may attach, on the
    small-lock-table cluster: its DSN as that role."""
    dsn = small_lock_db
    with psycopg.connect(small_lock_table, autocommit=True) as admin:
        admin.execute("DO $$BEGIN CREATE ROLE many_owner LOGIN REPLICATION; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
        admin.execute(f"GRANT CREATE ON DATABASE {dsn.rsplit('/', 1)[1]} TO many_owner")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("GRANT CREATE ON SCHEMA public TO many_owner")
    owner_dsn = dsn.replace("postgres@", "many_owner@")
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        for i in range(MANY_TABLES - 2):  # one table a statement: its locks fit
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, v text)")
        for name in ("p0", "p1"):
            conn.execute(f"CREATE TABLE {name} (id int, v text) PARTITION BY RANGE (id)")
            conn.execute(f"CREATE TABLE {name}_a PARTITION OF {name} FOR VALUES FROM (0) TO (10)")
            conn.execute(f"CREATE TABLE {name}_b PARTITION OF {name} FOR VALUES FROM (10) TO (20)")
    return dsn, owner_dsn


def _partitions(conn: psycopg.Connection, count: int) -> None:
    for i in range(count):
        conn.execute(f"CREATE TABLE m{i} PARTITION OF m FOR VALUES FROM ({i * 10}) TO ({i * 10 + 10})")


def _drop_slots(admin_dsn: str, dbname: str) -> None:
    from tests.conftest import _drop_slots as drop

    drop(admin_dsn, dbname)


def full_identities(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relreplident = 'f'").fetchone()[0]


@pytest.mark.parametrize("as_superuser", [False, True], ids=["table-list", "schema-publication"])
def test_attach_and_detach_of_more_tables_than_the_lock_table_holds_work_in_batches(many_tables, as_superuser):
    """One transaction locked every table: past the server's lock table, 'out of shared memory'
    (and, near it, every other session's next lock failed too)."""
    admin_dsn, owner_dsn = many_tables
    dsn = admin_dsn if as_superuser else owner_dsn
    result = attach(dsn, all_tables=True)
    assert len(result.tables) == MANY_TABLES
    assert full_identities(dsn) == MANY_TABLES + 4  # the partitions too
    assert len(result.replica_identity_changed) == MANY_TABLES + 4
    with connect(dsn) as conn:
        assert len(captured_tables(conn, result.publication)) == MANY_TABLES
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 1
    assert attach(dsn, all_tables=True).changed_anything is False
    detached = detach(dsn)
    assert len(detached.restored) == MANY_TABLES + 4
    assert full_identities(dsn) == 0
    with connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'flux'").fetchone()[0] == 0


def test_narrowing_a_list_of_more_tables_than_the_lock_table_holds_restores_the_rest_in_batches(many_tables):
    _, dsn = many_tables
    attach(dsn, all_tables=True)
    result = attach(dsn, tables=["t1", "p0"])
    assert len(result.replica_identity_restored) == MANY_TABLES - 2 + 2  # p1 with its partitions
    assert full_identities(dsn) == 2 + 2
    with connect(dsn) as conn:
        assert [str(t) for t in captured_tables(conn, "flux")] == ["public.p0", "public.t1"]


def test_turning_a_schema_publication_into_a_list_of_many_tables_keeps_every_table_captured_throughout(many_tables):
    """The first batch joining the list dropped the schema from the publication: every table of a later batch
    was left uncaptured (its identity restored) until its batch, and 400 tables' restores in that one
    transaction failed with 'out of shared memory'."""
    dsn, _ = many_tables
    attach(dsn, all_tables=True)
    result = attach(dsn, tables=[f"t{i}" for i in range(MANY_TABLES - 2)] + ["p0", "p1"])
    assert result.replica_identity_restored == [] and result.replica_identity_changed == []
    assert full_identities(dsn) == MANY_TABLES + 4
    with connect(dsn) as conn:
        assert len(captured_tables(conn, "flux")) == MANY_TABLES and published_schemas(conn, "flux") == []


def _dropping_while_it_waits(admin_dsn: str, flux_step, drop: str) -> list:
    """`flux_step()` in a thread, its first batch held up by a report reading t1; `drop` run while it waits, then
    the report ended. Returns what `flux_step` returned (nothing when it raised)."""
    report = psycopg.connect(admin_dsn, application_name="long-report")
    report.execute("SELECT count(*) FROM t1")
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(flux_step()), daemon=True)
    thread.start()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while not conn.execute("SELECT EXISTS (SELECT FROM pg_locks l JOIN pg_stat_activity s USING (pid)"
                               " WHERE s.application_name = 'flux' AND NOT l.granted)").fetchone()[0]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.execute(drop)
    report.rollback()
    report.close()
    thread.join(timeout=60)
    return outcome


def test_a_table_dropped_between_the_batches_of_a_non_superusers_attach_is_left_out_and_the_rest_attached(many_tables):
    """A batch joining the list failed ('relation "public.t397" does not exist') after the earlier ones were done."""
    admin_dsn, dsn = many_tables
    outcome = _dropping_while_it_waits(admin_dsn, lambda: attach(dsn, all_tables=True), "DROP TABLE t397, p1")
    assert outcome and len(outcome[0].tables) == MANY_TABLES
    with connect(dsn) as conn:
        assert len(captured_tables(conn, "flux")) == MANY_TABLES - 2
    assert full_identities(dsn) == MANY_TABLES - 2 + 2  # p0's partitions


def test_a_table_dropped_between_the_batches_of_a_detach_is_left_out_and_the_rest_detached(many_tables):
    """A batch letting go of the table list failed ('relation "public.t397" does not exist') midway."""
    admin_dsn, dsn = many_tables
    attach(dsn, all_tables=True)
    outcome = _dropping_while_it_waits(admin_dsn, lambda: detach(dsn), "DROP TABLE t397")
    assert outcome and len(outcome[0].restored) == MANY_TABLES + 4 - 1
    assert full_identities(dsn) == 0
    with connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)


def test_a_list_replaced_by_another_says_the_transactions_of_the_tables_joining_and_of_those_leaving_apart(many_tables):
    """Each said the count of both: 'added 198 tables, in 15 transactions', 'removed 200 tables, in 15 transactions'.
    A table leaving weighs twice one joining (its publication entry's lock), so its batches are more."""
    _, dsn = many_tables
    attach(dsn, tables=[f"t{i}" for i in range(200)])
    said = [line for line in attach(dsn, tables=[f"t{i}" for i in range(200, MANY_TABLES - 2)]).created
            if " tables, in " in line]
    assert [line.split(":")[1].split(" tables")[0] for line in said] == [" added 198", " removed 200"]
    joining, leaving = (int(line.split(" in ")[1].split()[0]) for line in said)
    assert 1 < joining < leaving


def test_a_detach_stopped_midway_leaves_no_partition_still_listed_with_its_identity_restored(many_tables):
    """A partition listed by itself, in a later batch than its table, got its identity back with its table's batch:
    stopped between the two, the publication held it key-only, which an engine run then would record so."""
    admin_dsn, dsn = many_tables
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE z_part PARTITION OF p0 FOR VALUES FROM (20) TO (30)")  # its own batch is the last
    attach(dsn, tables=[f"t{i}" for i in range(MANY_TABLES - 2)] + ["p0", "p1", "z_part"])
    report = psycopg.connect(admin_dsn, application_name="long-report")
    try:
        report.execute("SELECT count(*) FROM t200")
        with pytest.raises(LockTimeoutError):
            detach(dsn, lock_timeout=0.1)
    finally:
        report.close()
    with connect(dsn) as conn:
        assert "public.z_part" in [str(t) for t in captured_tables(conn, "flux")]
        assert identities(conn, "z_part") == {"z_part": "f"}
    detach(dsn)
    assert full_identities(dsn) == 0


def test_attach_refuses_a_partitioned_table_whose_partitions_alone_would_fill_the_lock_table_changing_nothing(
        small_lock_db):
    """ALTER PUBLICATION ... ADD TABLE locks every partition at once: with 150, most of this server's
    lock table, every other session's next lock could fail meanwhile."""
    dsn = small_lock_db
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int) PARTITION BY RANGE (id)")
        _partitions(conn, 150)
    with pytest.raises(PreflightError) as raised:
        attach(dsn, tables=["m"])
    assert "would lock 151 tables at once" in raised.value.message
    assert raised.value.message.startswith("Attach changed nothing")
    assert "(now 10: ALTER SYSTEM SET max_locks_per_transaction = 64, then restart PostgreSQL)" in raised.value.hint
    assert full_identities(dsn) == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('flux')").fetchone()[0] is None


def test_attach_and_detach_of_many_tables_make_round_trips_by_the_dozen_not_by_the_table(dsn, conn, monkeypatch):
    """Each table's partitions were looked up one statement at a time, and each identity read even when
    FULL: two statements and more a table attached again (450 here; 9,050 for 3,000 tables, seconds over a
    network). And FULL was set in three a table, all of them held ACCESS EXCLUSIVE meanwhile: 3,000 tables
    were locked 4 s (1.3 s now)."""
    for i in range(200):
        conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY)")
    statements = []
    execute = psycopg.Connection.execute
    monkeypatch.setattr(psycopg.Connection, "execute", lambda self, *args, **kwargs: (statements.append(args[0]),
                                                                                       execute(self, *args, **kwargs))[1])
    assert len(attach(dsn, all_tables=True).replica_identity_changed) == 200
    assert identities(conn, "t0", "t199") == {"t0": "f", "t199": "f"}
    assert len(statements) < 100
    statements.clear()
    assert attach(dsn, all_tables=True).changed_anything is False
    assert len(statements) < 100
    statements.clear()  # detach restored each in five (a savepoint each): 3,000 tables locked 6 s (1 s now)
    assert len(detach(dsn).restored) == 200
    assert identities(conn, "t0", "t199") == {"t0": "d", "t199": "d"}
    assert len(statements) < 100



def test_attach_and_detach_leave_the_event_trigger_out_of_their_own_alter_table(dsn, conn):
    """It ran its look at the catalogs (10 ms among 3,000 tables) for each table they altered, while they held every
    one ACCESS EXCLUSIVE: a detach of 3,000 tables took 30 s, 7 s without it. A spy trigger sees what Flux's does."""
    conn.execute("CREATE TABLE spy (tag text, table_name text, own_ddl text)")
    conn.execute("""CREATE FUNCTION spy() RETURNS event_trigger LANGUAGE plpgsql AS $$
                    BEGIN
                        INSERT INTO spy SELECT command_tag, object_identity, current_setting('flux.own_ddl', true)
                        FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table';
                    END $$""")
    conn.execute("CREATE EVENT TRIGGER spy ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION spy()")
    for i in range(3):
        conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    attach(dsn, tables=["t0"])
    detach(dsn)
    seen = conn.execute("SELECT table_name, own_ddl FROM spy WHERE table_name <> 'public.spy' ORDER BY 1").fetchall()
    assert len(seen) == 3 + 2 + 1 and {own for _, own in seen} == {"on"}  # FULL, two restored, one restored
    conn.execute("ALTER TABLE t0 ADD COLUMN note text")  # an application's
    assert conn.execute("SELECT own_ddl FROM spy WHERE table_name = 'public.t0' ORDER BY ctid DESC LIMIT 1").fetchone() == (None,)


def test_the_event_trigger_leaves_a_transaction_marked_as_fluxs_own_alone(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    with conn.transaction():
        conn.execute("SELECT set_config('flux.own_ddl', 'on', true)")
        conn.execute("CREATE TABLE p (id int) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10)")
    conn.execute("CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20)")
    assert identities(conn, "p", "p1", "p2") == {"p": "d", "p1": "d", "p2": "f"}


def test_detach_refuses_a_partitioned_table_whose_partitions_alone_would_fill_the_lock_table_changing_nothing(
        small_lock_db):
    """Its leaving the publication locks every partition at once; its partitions came after attach."""
    dsn = small_lock_db
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE m (id int) PARTITION BY RANGE (id)")
        attach(dsn, tables=["m"])
        _partitions(conn, 150)  # FULL as each is created (the event trigger)
    with pytest.raises(PreflightError) as raised:
        detach(dsn)
    assert raised.value.message.startswith("Detach changed nothing") and "would lock 153 tables" in raised.value.message
    assert full_identities(dsn) == 151
    with connect(dsn) as conn:
        assert [str(t) for t in captured_tables(conn, "flux")] == ["public.m"]


def test_detach_says_which_identity_postgresql_refused_and_restores_the_others(dsn, conn):
    """Restored in one statement for all tables, one refused among them is left FULL, said, and the rest restored."""
    identity_by_index(conn, "a", "a_u_idx")
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    attach(dsn, tables=["a", "b"])
    conn.execute("ALTER TABLE a ALTER COLUMN u DROP NOT NULL")  # allowed while FULL; the index no longer can be
    result = detach(dsn)
    assert result.restored == [{"table": "public.b", "restored": "DEFAULT"}]
    assert result.warnings == ['public.a: left REPLICA IDENTITY FULL: PostgreSQL refused USING INDEX a_u_idx (index '
                               '"a_u_idx" cannot be used as replica identity because column "u" is nullable).']
    assert identities(conn, "a", "b") == {"a": "f", "b": "d"}
