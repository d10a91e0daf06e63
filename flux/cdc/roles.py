"""What each part's role needs, checked before it acts, with the fix.

A team may run `flux attach`, `flux cdc run` and the gateway (`flux serve --no-engine`) as three
roles (README, "Least privilege"). `check_role` checks the attaching role before attach changes
anything (with `role_named_flux_warnings`, a role whose search_path would reach Flux's schema); the
engine's and the gateway's are checked once, at start: a privilege found missing only when a rare path
first needs it (a context message after 500 rows, which updates rows already written) would
stop the engine hours later. It does not check privileges on the application's tables: the
engine reads none, and what a function may do is the project's business.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from flux.cdc.publication import TableRef, not_owned
from flux.errors import PreflightError
from flux.project import Retention
from flux.store.schema import SCHEMA

# Table of the flux schema -> privileges. SELECT where a statement reads the table too: an
# UPDATE's WHERE, an INSERT's ON CONFLICT, the engine's FOR SHARE read of its progress.
ENGINE_TABLES: dict[str, tuple[str, ...]] = {
    "meta": ("SELECT",),
    "attachments": ("SELECT",),
    # Reconcile reads it to find tables a superuser's attach (whole schemas) left without FULL identity.
    "replica_identity_changes": ("SELECT",),
    "cdc_progress": ("SELECT", "INSERT", "UPDATE"),
    "state_mutations": ("SELECT", "INSERT", "UPDATE"),
}
GATEWAY_TABLES: dict[str, tuple[str, ...]] = {
    "meta": ("SELECT",),
    "trace_requests": ("SELECT", "INSERT"),  # INSERT ... ON CONFLICT, and GET /_flux/requests
}


def missing_grants(conn: psycopg.Connection, needs: dict[str, tuple[str, ...]]) -> list[str]:
    """The GRANT statements the current role lacks for `needs`; none when there is no flux schema
    yet (whoever creates it owns it). Looked up by oid: a name lookup would itself need USAGE."""
    role = conn.execute("SELECT current_user").fetchone()[0]
    quoted = '"' + role.replace('"', '""') + '"'
    usage = conn.execute("SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone()
    if usage is None:
        return []
    grants = [] if usage[0] else [f"GRANT USAGE ON SCHEMA {SCHEMA} TO {quoted};"]
    by_privileges: dict[tuple[str, ...], list[str]] = {}
    for table, privileges in needs.items():
        row = conn.execute(
            "SELECT array(SELECT p FROM unnest(%s::text[]) p WHERE NOT has_table_privilege(c.oid, p))"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (list(privileges), SCHEMA, table),
        ).fetchone()
        if row is not None and row[0]:  # a table an older schema lacks comes with its upgrade
            by_privileges.setdefault(tuple(row[0]), []).append(f"{SCHEMA}.{table}")
    for privileges, tables in by_privileges.items():
        grants.append(f"GRANT {', '.join(privileges)} ON {', '.join(tables)} TO {quoted};")
    return grants


def require_engine_role(conn: psycopg.Connection, *, slot: str) -> None:
    """Raise PreflightError unless the current role may stream the slot and write what it records."""
    role, can_replicate = conn.execute(
        "SELECT current_user, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not can_replicate:
        raise PreflightError(
            f"Role '{role}' may not use replication, which the engine needs to read the slot",
            hint=f'As a superuser run: ALTER ROLE "{role}" WITH REPLICATION;', role=role, slot=slot,
        )
    grants = missing_grants(conn, ENGINE_TABLES)
    if grants:
        raise PreflightError(
            f"Role '{role}' lacks privileges the engine needs on the flux schema",
            hint="As the role that ran `flux attach` (it owns the flux schema) run: " + " ".join(grants), role=role, slot=slot,
        )


def prune_needs(*, traces: bool, mutations: bool) -> dict[str, tuple[str, ...]]:
    """What a prune (`flux.store.retention`) of the logs asked for needs: SELECT and DELETE on each
    (a DELETE with a WHERE reads what it deletes), and the upsert of its cutoff into `flux.meta`."""
    needs = {table: ("SELECT", "DELETE") for table, asked in (("trace_requests", traces), ("state_mutations", mutations))
             if asked}
    return {**needs, "meta": ("SELECT", "INSERT", "UPDATE")} if needs else {}


def gateway_needs(*, record: bool, retention: Retention | None = None) -> dict[str, tuple[str, ...]]:
    """What the gateway's role needs: traces to write with `record`, and what its hourly prune
    needs with `retention`."""
    needs = {table: list(privileges) for table, privileges in GATEWAY_TABLES.items() if record or table == "meta"}
    prunes = prune_needs(traces=bool(retention and retention.traces), mutations=bool(retention and retention.mutations))
    for table, privileges in prunes.items():
        needs.setdefault(table, []).extend(privileges)
    return {table: tuple(dict.fromkeys(privileges)) for table, privileges in needs.items()}


def require_gateway_role(conn: psycopg.Connection, *, record: bool, retention: Retention | None = None) -> None:
    """Raise PreflightError unless the current role may write and read traces (with `record`) and
    prune what `retention` keeps for a time."""
    grants = missing_grants(conn, gateway_needs(record=record, retention=retention))
    if grants:
        role = conn.execute("SELECT current_user").fetchone()[0]
        what = "to record requests" + (" and prune what [retention] keeps for a time" if retention and (retention.traces or retention.mutations) else "")
        raise PreflightError(
            f"Role '{role}' lacks privileges the gateway needs on the flux schema {what}",
            hint="As the role that ran `flux attach` (it owns the flux schema) run: " + " ".join(grants), role=role,
        )


def check_role(conn: psycopg.Connection, tables: list[TableRef]) -> None:
    """Raise PreflightError naming everything the attaching role lacks at once, each with its
    statement: one refusal at a time would make a DBA grant, retry and be refused again."""
    user, may_replicate, may_create, database = conn.execute(
        "SELECT current_user, rolsuper OR rolreplication, has_database_privilege(current_database(), 'CREATE'),"
        " current_database() FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    role = sql.Identifier(user).as_string(conn)
    gaps: list[tuple[str, str]] = []  # (what it may not do, the statement that lets it)
    if not may_replicate:
        gaps.append(("may not use replication", f"As a superuser run: ALTER ROLE {role} WITH REPLICATION;"))
    if not may_create:
        gaps.append(("may not create schemas or publications in this database",
                     f"As the database owner run: GRANT CREATE ON DATABASE {sql.Identifier(database).as_string(conn)} TO {role};"))
    unowned = not_owned(conn, tables)
    if unowned:
        listed, fixes = _ownership_fix(conn, role, unowned)
        gaps.append((f"needs to own the tables it captures (to set REPLICA IDENTITY and publish them), and does not own: "
                     f"{listed}", f"As a superuser run: {fixes} Or attach as the owner, or leave these tables out (--tables)."))
    if gaps:
        raise PreflightError(f"Role '{user}' " + "; it ".join(what for what, _ in gaps), hint=" ".join(fix for _, fix in gaps),
                             role=user, tables=len(unowned) or None)


def _ownership_fix(conn: psycopg.Connection, role: str, unowned: list[tuple[str, str, str]]) -> tuple[str, str]:
    """The tables of `unowned` (schema, table, owner) as a list to say, and the statements that give
    `role` (quoted) their ownership."""
    listed = ", ".join(f"{s}.{t} (owner {o})" for s, t, o in unowned[:10])
    more = f" and {len(unowned) - 10} more" if len(unowned) > 10 else ""
    supers = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolsuper AND rolname = ANY(%s)",
                                          (list({o for _, _, o in unowned}),)).fetchall()}
    fixes = []
    owners = sorted({o for _, _, o in unowned} - supers)
    if owners:
        fixes.append(f"GRANT {', '.join(sql.Identifier(o).as_string(conn) for o in owners)} TO {role}; (membership "
                     "gives it everything those roles own).")
    # Membership in a superuser role would make it one: those tables change owner instead.
    fixes += [f"ALTER TABLE {sql.Identifier(s, t).as_string(conn)} OWNER TO {role};" for s, t, o in unowned if o in supers][:10]
    return listed + more, " ".join(fixes)


def check_detach_role(conn: psycopg.Connection, tables: list[TableRef]) -> None:
    """Raise PreflightError naming each of `tables` (those whose identity detach restores) that the
    role does not own, with the statements that let it: an owner changed since attach failed detach,
    all or nothing, with PostgreSQL's 'must be owner of table' for the first, and a hint to run it as
    the role that attached, which it was."""
    unowned = not_owned(conn, tables, partitions=False)  # each partition detach restores is among `tables`
    if unowned:
        user = conn.execute("SELECT current_user").fetchone()[0]
        listed, fixes = _ownership_fix(conn, sql.Identifier(user).as_string(conn), unowned)
        raise PreflightError(
            f"Role '{user}' needs to own the tables whose replica identity detach restores, and does not own: {listed}",
            hint=f"As a superuser run: {fixes} Or detach as a superuser. Nothing was changed.", role=user, tables=len(unowned))


def role_named_flux_warnings(conn: psycopg.Connection) -> list[str]:
    """A role named flux whose search_path starts with "$user" now finds Flux's schema first: its
    unqualified names reach Flux's tables (an application's `attachments` or `meta`), and the
    tables it creates land there, which `flux detach --drop-data` would drop."""
    row = conn.execute(
        """
        SELECT (SELECT cfg FROM pg_db_role_setting s CROSS JOIN unnest(s.setconfig) cfg
                WHERE s.setrole = r.oid AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
                  AND cfg LIKE 'search\\_path=%%' ORDER BY s.setdatabase DESC LIMIT 1),
               current_setting('search_path')
        FROM pg_roles r WHERE r.rolname = %s
        """,
        (SCHEMA,),
    ).fetchone()
    if row is None:
        return []
    path = row[0].split("=", 1)[1] if row[0] else row[1]  # the role's own setting, else this database's
    if "$user" not in path:
        return []
    return [f'A role named {SCHEMA} exists, and its search_path ({path}) puts "$user", so schema {SCHEMA} (Flux\'s) first: '
            f"its unqualified table names reach Flux's tables before yours (attachments, meta, ...), and the tables it creates "
            f"land in Flux's schema, which `flux detach --drop-data` drops. Run: ALTER ROLE {SCHEMA} SET search_path = public;"]
