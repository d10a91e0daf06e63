"""Least privilege: the README's three roles, and the start checks of the engine's and the gateway's."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

import flux.context
from flux.cdc.attach import attach, detach
from flux.cdc.engine import Engine, EngineConfig
from flux.errors import PreflightError
from flux.gateway.server import ensure_store
from tests.support import mutations, start_engine

README = Path(__file__).resolve().parents[2] / "README.md"
ROLES = ("flux_attach", "flux_engine", "flux_gateway", "app_owner")


def readme_sql() -> list[str]:
    """The SQL blocks of the README's "Least privilege" section, in order."""
    text = README.read_text()
    section = text[text.index("### Least privilege"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


@contextmanager
def unique_roles(conn: psycopg.Connection) -> Iterator[dict[str, str]]:
    """The README's role names made unique in the session cluster (roles are per cluster), dropped
    afterwards with what they own and were granted."""
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"{role}_{suffix}" for role in ROLES}
    try:
        yield names
    finally:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" OWNER TO postgres')
        for name in names.values():
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE "{name}"')


def as_role(dsn: str, role: str) -> str:
    return dsn.replace("postgres@", f"{role}@")


def run_script(dsn: str, script: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for statement in filter(str.strip, re.sub(r"--[^\n]*", "", script).split(";")):
            c.execute(statement)


def renamed(script: str, names: dict[str, str], db: str) -> str:
    for role, name in names.items():
        script = re.sub(rf"\b{role}\b", name, script)
    return script.replace("DATABASE app ", f'DATABASE "{db}" ')


APP_SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (id uuid PRIMARY KEY, email text NOT NULL);
CREATE TABLE shop.orders (id int PRIMARY KEY, customer_id uuid NOT NULL REFERENCES shop.customers ON DELETE CASCADE,
                          status text NOT NULL);
CREATE UNIQUE INDEX orders_identity ON shop.orders (id, customer_id);
ALTER TABLE shop.orders REPLICA IDENTITY USING INDEX orders_identity;
CREATE TABLE shop.invoices (id int, issued date, amount numeric, PRIMARY KEY (id, issued)) PARTITION BY RANGE (issued);
CREATE TABLE shop.invoices_2026 PARTITION OF shop.invoices FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
"""


def test_the_readmes_least_privilege_roles_attach_record_serve_and_detach(dsn, conn):
    superuser_sql, flux_schema_sql = readme_sql()
    roles_sql, owner_sql = re.split(r"^-- 2\..*$", superuser_sql, flags=re.M)
    db = conn.info.dbname
    with unique_roles(conn) as names:
        conn.execute(f'CREATE ROLE "{names["app_owner"]}" LOGIN')
        conn.execute(f'ALTER DATABASE "{db}" OWNER TO "{names["app_owner"]}"')
        owner = as_role(dsn, names["app_owner"])
        run_script(owner, APP_SCHEMA)
        run_script(dsn, renamed(roles_sql, names, db))
        run_script(owner, renamed(owner_sql, names, db))
        attach(as_role(dsn, names["flux_attach"]), all_tables=True)
        run_script(as_role(dsn, names["flux_attach"]), renamed(flux_schema_sql, names, db))
        # What the functions do, granted by the application's owner (Flux needs nothing there).
        gateway_role = names["flux_gateway"]
        run_script(owner, f'GRANT USAGE ON SCHEMA shop TO "{gateway_role}";'
                          f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA shop TO "{gateway_role}"')
        gateway = as_role(dsn, gateway_role)
        ensure_store(gateway)  # the gateway's start check passes
        # A short reconcile interval: the engine looks for new tables while it runs (and may not stop for it).
        engine = start_engine(as_role(dsn, names["flux_engine"]), reconcile_interval=0.2)
        try:
            with psycopg.connect(gateway) as c:
                with flux.context.request(c, request_id="req-signup"):
                    c.execute("INSERT INTO shop.customers VALUES ('00000000-0000-0000-0000-000000000001', 'a@x')")
                    c.execute("INSERT INTO shop.orders VALUES (1, '00000000-0000-0000-0000-000000000001', 'new')")
                    c.execute("INSERT INTO shop.invoices VALUES (1, '2026-05-01', 9.5)")
                # 600 rows before the context message: the engine has written some when it comes,
                # and updates them (the path that needs UPDATE on state_mutations).
                with flux.context.request(c, request_id="req-delete") as req:
                    c.execute("UPDATE shop.orders SET status = 'seen' FROM generate_series(1, 600) WHERE false")
                    c.execute("INSERT INTO shop.orders SELECT g, '00000000-0000-0000-0000-000000000001', 'bulk'"
                              " FROM generate_series(2, 601) g")
                    flux.context.emit(c, req.request_id)
                    c.execute("DELETE FROM shop.customers")  # cascades to every order
            engine.caught_up()
            time.sleep(0.5)  # a reconcile pass or two, which must not stop the engine
            engine.caught_up()
        finally:
            engine.stop()
        recorded = mutations(dsn)
        assert [(m["table"], m["op"], m["request_id"]) for m in recorded[:3]] == [
            ("customers", "insert", "req-signup"), ("orders", "insert", "req-signup"), ("invoices", "insert", "req-signup")]
        rest = recorded[3:]
        assert len(rest) == 600 + 1 + 601 and {m["request_id"] for m in rest} == {"req-delete"}
        result = detach(as_role(dsn, names["flux_attach"]))
        assert {r["table"]: r["restored"] for r in result.restored} == {
            "shop.customers": "DEFAULT", "shop.orders": "USING INDEX orders_identity",
            "shop.invoices": "DEFAULT", "shop.invoices_2026": "DEFAULT"}
        assert not conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = current_database()").fetchone()
        assert not conn.execute("SELECT 1 FROM pg_publication").fetchone()


@contextmanager
def engine_role(conn: psycopg.Connection, dsn: str, *, replication: bool = True) -> Iterator[tuple[str, str]]:
    """A new login role with no privilege: (its name, a DSN that logs in as it)."""
    name = f"engine_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {name} LOGIN {'REPLICATION' if replication else ''}")
    try:
        yield name, as_role(dsn, name)
    finally:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


def test_cdc_run_refuses_a_role_without_replication_at_once_with_the_alter_role_fix(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    with engine_role(conn, dsn, replication=False) as (role, role_dsn):
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA flux TO {role}")
        # Before: the walsender's refusal was a lost connection, retried forever without a hint.
        proc = subprocess.run([sys.executable, "-m", "flux", "cdc", "run", "--database", role_dsn],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 4, proc.stderr
    error, hint = proc.stderr.strip().splitlines()
    assert error.startswith("error: Role 'engine_") and "may not use replication" in error
    assert hint.startswith("hint: As a superuser run: ALTER ROLE \"engine_") and hint.endswith("WITH REPLICATION;")


def test_the_engine_names_every_grant_it_lacks_before_it_reads_the_slot(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    with engine_role(conn, dsn) as (role, role_dsn):
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT INSERT ON flux.state_mutations TO {role}")
        with pytest.raises(PreflightError) as raised:
            Engine(EngineConfig(dsn=role_dsn)).run(install_signal_handlers=False)
    assert raised.value.message == f"Role '{role}' lacks privileges the engine needs on the flux schema"
    assert raised.value.hint == (
        f'As the role that ran `flux attach` (it owns the flux schema) run: GRANT SELECT ON flux.meta, flux.attachments, '
        f'flux.replica_identity_changes TO "{role}"; '
        f'GRANT SELECT, INSERT, UPDATE ON flux.cdc_progress TO "{role}"; GRANT SELECT, UPDATE ON flux.state_mutations TO "{role}";')
    assert conn.execute("SELECT confirmed_flush_lsn IS NOT NULL, NOT active FROM pg_replication_slots"
                        " WHERE slot_name = 'flux'").fetchone() == (True, True)


def test_an_engine_granted_what_its_start_check_asks_can_look_for_new_tables_of_a_superusers_attachment(dsn, conn):
    """A superuser's attach publishes whole schemas, and reconcile then reads flux.replica_identity_changes:
    refused, the engine logged "Could not check for new tables" every pass (about 10 s), for good."""
    from flux.cdc.autocapture import reconcile
    from flux.cdc.roles import ENGINE_TABLES, missing_grants, require_engine_role

    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, all_tables=True)
    assert conn.execute("SELECT count(*) FROM pg_publication_namespace").fetchone()[0] > 0  # whole schemas
    with engine_role(conn, dsn) as (_, role_dsn):
        with psycopg.connect(role_dsn, autocommit=True) as engine:
            for grant in missing_grants(engine, ENGINE_TABLES):
                conn.execute(grant)
            require_engine_role(engine, slot="flux")
            assert reconcile(engine, slot="flux") == []


def test_the_gateway_refuses_at_start_a_role_that_could_not_record_its_traces(dsn, conn):
    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    with engine_role(conn, dsn, replication=False) as (role, role_dsn):
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT SELECT ON flux.meta TO {role}")
        # Before: it started, and then every request logged that its trace was refused.
        with pytest.raises(PreflightError) as raised:
            ensure_store(role_dsn)
        ensure_store(role_dsn, record=False)  # no traces, nothing more to grant
    assert raised.value.hint.endswith(f'run: GRANT SELECT, INSERT ON flux.trace_requests TO "{role}";')


def test_the_gateway_refuses_at_start_a_role_that_could_not_prune_what_retention_asks(dsn, conn):
    from datetime import timedelta

    from flux.project import Retention

    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    with engine_role(conn, dsn, replication=False) as (role, role_dsn):
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT SELECT ON flux.meta TO {role};"
                     f" GRANT SELECT, INSERT ON flux.trace_requests TO {role}")
        ensure_store(role_dsn)  # recording alone: granted
        # Before: it started, and its hourly prune then failed, hour after hour, in its log only.
        with pytest.raises(PreflightError) as raised:
            ensure_store(role_dsn, retention=Retention(traces=timedelta(days=30), mutations=timedelta(days=90)))
        conn.execute(f"GRANT DELETE ON flux.trace_requests TO {role}; GRANT INSERT, UPDATE ON flux.meta TO {role}")
        ensure_store(role_dsn, retention=Retention(traces=timedelta(days=30)))  # traces only: granted now
    assert "and prune what [retention] keeps for a time" in raised.value.message
    assert raised.value.hint.endswith(
        f'run: GRANT INSERT, UPDATE ON flux.meta TO "{role}"; GRANT DELETE ON flux.trace_requests TO "{role}"; '
        f'GRANT SELECT, DELETE ON flux.state_mutations TO "{role}";')
