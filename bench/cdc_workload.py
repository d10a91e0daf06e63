"""The write workloads of bench/cdc.py: pgbench scripts and the SQL that installs what they need.

- the tpcb-like script with Flux's request-context message in each transaction;
- the generic row-audit trigger, the classic alternative to CDC;
- the server-side loop that commits the backlog (with the same message).

Nothing here connects to a server or runs a process: bench/cdc.py does.
"""

from __future__ import annotations

CHANGES_PER_TXN = 4  # tpcb-like: three UPDATEs and one INSERT
TABLES = ["public.pgbench_accounts", "public.pgbench_branches", "public.pgbench_tellers", "public.pgbench_history"]

# The message as the README recommends sending it: with BEGIN, in the same round trip
# (`\\;` makes one pgbench command of both), so it costs one WAL record and no extra round trip.
# The JSON is built by the client, as an application does (flux.context builds it with orjson):
# pgbench substitutes its variables into the literal. The request id is unique per transaction:
# the client's id and a 50-bit random number (pgbench has no per-transaction counter).
CONTEXT_STATEMENTS = (
    "\\set rid random(1, 1125899906842624)\n",
    "BEGIN \\; SELECT pg_logical_emit_message(true, 'flux', "
    "'{\"request_id\": \"pgbench-:client_id-:rid\", \"function\": \"pgbench\"}');\n",
)
# With prepared statements (`pgbench -M prepared`, as drivers run repeated statements) one
# command is one statement, so the message is a statement of its own, one more round trip: what
# `flux.context.emit` costs on a psycopg connection. Variables are parameters there, so the JSON is
# built by format(); the casts type the parameters.
PREPARED_CONTEXT_STATEMENTS = (
    CONTEXT_STATEMENTS[0],
    "BEGIN;\nSELECT pg_logical_emit_message(true, 'flux', "
    "format('{\"request_id\": \"pgbench-%s-%s\", \"function\": \"pgbench\"}', :client_id::int, :rid::bigint));\n",
)


def with_context_message(builtin: str, *, prepared: bool = False) -> str:
    """pgbench's built-in script (`pgbench --show-script=tpcb-like`) plus the `flux` message.

    BEGIN and the message go together as the transaction's first command (with `prepared`, as
    its first two); the rest is unchanged.
    """
    lines = [line + "\n" for line in builtin.splitlines() if line.strip() and not line.startswith("--")]
    begin = next((i for i, line in enumerate(lines) if line.strip().upper() == "BEGIN;"), None)
    if begin is None:
        raise ValueError(f"no BEGIN; in pgbench's tpcb-like script:\n{builtin}")
    set_rid, begin_and_emit = PREPARED_CONTEXT_STATEMENTS if prepared else CONTEXT_STATEMENTS
    return "".join([set_rid, *lines[:begin], begin_and_emit, *lines[begin + 1 :]])


# A generic row-audit trigger of the classic kind (one log table, whole rows as jsonb, a
# bigserial key), on the same four tables. It runs in the writing transaction.
AUDIT_INSTALL_SQL = """
CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    table_name text NOT NULL,
    op         text NOT NULL,
    old_row    jsonb,
    new_row    jsonb,
    changed_at timestamptz NOT NULL,
    txid       bigint NOT NULL
);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (table_name, op, old_row, new_row, changed_at, txid)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            now(), txid_current());
    RETURN NULL;
END $$;
""" + "".join(
    f"CREATE TRIGGER audit_row AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION audit_row();\n"
    for table in TABLES
)

AUDIT_REMOVE_SQL = "".join(f"DROP TRIGGER audit_row ON {table};\n" for table in TABLES) + (
    "DROP FUNCTION audit_row();\nDROP TABLE audit_log;\n"
)


# One tpcb-like transaction per iteration, committed by the loop: the same four changes as
# pgbench's script, without a client round trip per statement, each with its `flux` context
# message as Flux's own writes carry one (so the engine records a request id and a context per row).
BACKLOG_SQL = """
DO $$
DECLARE v_aid int; v_bid int; v_tid int; v_delta int;
BEGIN
  FOR i IN 1..{n} LOOP
    v_aid := 1 + floor(random() * {accounts})::int;
    v_bid := 1 + floor(random() * {branches})::int;
    v_tid := 1 + floor(random() * {tellers})::int;
    v_delta := floor(random() * 10001)::int - 5000;
    PERFORM pg_logical_emit_message(true, 'flux',
        format('{{"request_id": "backlog-%s-%s", "function": "backlog"}}', pg_backend_pid(), i));
    UPDATE pgbench_accounts SET abalance = abalance + v_delta WHERE aid = v_aid;
    UPDATE pgbench_tellers SET tbalance = tbalance + v_delta WHERE tid = v_tid;
    UPDATE pgbench_branches SET bbalance = bbalance + v_delta WHERE bid = v_bid;
    INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (v_tid, v_bid, v_aid, v_delta, CURRENT_TIMESTAMP);
    COMMIT;
  END LOOP;
END $$
"""
