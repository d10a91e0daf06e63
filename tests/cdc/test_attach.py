"""Library-level attach behaviour: table selection, publication sync, capture of tables created later."""

from __future__ import annotations

import pytest

from flux.cdc.attach import attach, published_tables, reconcile_new_tables
from flux.errors import ConfigError


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
    assert [str(t) for t in published_tables(conn, "flux")] == ["public.b"]
    assert "publication flux: removed public.a" in result.created
    assert identities(conn, "a", "b") == {"a": "d", "b": "f"}


def test_partitions_get_full_identity_on_attach(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    conn.execute("CREATE TABLE m1 PARTITION OF m FOR VALUES FROM ('2020-01-01') TO ('2021-01-01')")
    attach(dsn, tables=["m"])
    assert identities(conn, "m", "m1") == {"m": "f", "m1": "f"}


def test_event_trigger_captures_table_created_later_in_its_own_transaction(dsn, conn):
    attach(dsn, all_tables=True)
    conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
    assert "public.later" in [str(t) for t in published_tables(conn, "flux")]
    assert identities(conn, "later") == {"later": "f"}


def test_reconcile_adds_new_tables_and_attached_partitions_without_event_trigger(dsn, conn):
    conn.execute("CREATE TABLE m (id int, t date, PRIMARY KEY (id, t)) PARTITION BY RANGE (t)")
    attach(dsn, all_tables=True)
    conn.execute("DROP EVENT TRIGGER flux_capture_new_tables")
    conn.execute("CREATE TABLE m2 (id int, t date NOT NULL, PRIMARY KEY (id, t))")
    conn.execute("ALTER TABLE m ATTACH PARTITION m2 FOR VALUES FROM ('2021-01-01') TO ('2022-01-01')")
    conn.execute("CREATE TABLE newt (id int PRIMARY KEY)")
    assert reconcile_new_tables(dsn, slot="flux") == ["public.newt"]
    assert identities(conn, "m2", "newt") == {"m2": "f", "newt": "f"}
    assert reconcile_new_tables(dsn, slot="flux") == []


def test_reconcile_does_nothing_for_an_explicit_table_list(dsn, conn):
    conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    attach(dsn, tables=["a"])
    conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    assert reconcile_new_tables(dsn, slot="flux") == []


def test_non_superuser_all_tables_attach_warns_about_the_capture_gap(dsn, conn):
    conn.execute("CREATE ROLE app_owner LOGIN REPLICATION")
    conn.execute(f'GRANT CREATE ON DATABASE "{conn.info.dbname}" TO app_owner')
    try:
        result = attach(dsn.replace("postgres@", "app_owner@"), all_tables=True)
        assert any("Not a superuser, so no event trigger" in w for w in result.warnings)
    finally:
        from tests.conftest import _drop_slots

        conn.execute("DROP PUBLICATION IF EXISTS flux")
        _drop_slots(dsn, conn.info.dbname)
        conn.execute("DROP SCHEMA flux CASCADE")
        conn.execute(f'REVOKE CREATE ON DATABASE "{conn.info.dbname}" FROM app_owner')
        conn.execute("DROP ROLE app_owner")
