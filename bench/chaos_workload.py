"""The chaos harness's writers and their ground truth (see `chaos.py`).

Writers run transactions on their own connections and log what committed: per transaction, its
xid, the request id its changes must carry, and each row change with its old and new image, in
the form `flux.state_mutations` records it. `compare()` checks the log against that truth.

Each writer owns its rows (keys carry its number), so its commit order is every one of its rows'
order. A writer whose connection drops (a server restart) reconnects and settles an in-doubt
COMMIT by its commit mark, a row in an unpublished table written in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg

SCHEMA = """
CREATE TABLE accounts (id text PRIMARY KEY, owner text, balance numeric(14,2), note text, blob bytea, doc jsonb);
CREATE TABLE ledger (writer int NOT NULL, n bigint NOT NULL, amount numeric(12,2), memo text);  -- no primary key
CREATE TABLE parted (region int NOT NULL, id bigint NOT NULL, v text, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
CREATE TABLE parted_0 PARTITION OF parted FOR VALUES IN (0);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES IN (1);
CREATE TABLE parted_2 PARTITION OF parted FOR VALUES IN (2);
CREATE TABLE bulk (id bigint PRIMARY KEY, w int NOT NULL, payload jsonb);
CREATE TABLE commit_marks (request_id text PRIMARY KEY);  -- unpublished: settles an in-doubt COMMIT
CREATE TABLE scratch (id bigserial PRIMARY KEY, v text);  -- unpublished: must leave no trace
"""
PUBLISHED = ["accounts", "ledger", "parted", "bulk"]
OWNERS = ["alice", "O'Brien", "tab\there", "new\nline", "back\\slash", "ünïcødé ✓", "", None, '"q"', "\\N"]
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Txn:
    writer: int
    number: int
    xid: int
    request_id: str | None  # what its changes must carry (None: no context message)
    changes: list[tuple]  # (table, op, row_key, old, new)
    large: bool = False


@dataclass
class Workload:
    dsn: str
    writers: int = 3
    seed: int = 0
    large_every: int = 60  # about one transaction in this many is large (10k+ rows, or MB-sized values)
    committed: dict[int, Txn] = field(default_factory=dict)  # xid -> txn
    aborted: list[str] = field(default_factory=list)  # request ids rolled back on purpose or lost to a fault
    decoys: int = 0
    errors: list[BaseException] = field(default_factory=list)
    disconnects: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.writers)]

    def start(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, index: int) -> None:
        try:
            _Writer(self, index).run()
        except BaseException as exc:  # reported by the harness
            self.errors.append(exc)

    def record(self, txn: Txn | None, request_id: str) -> None:
        with self._lock:
            if txn is None:
                self.aborted.append(request_id)
            else:
                self.committed[txn.xid % 2**32] = txn

    def volumes(self) -> dict[str, int]:
        txns = list(self.committed.values())
        return {
            "committed_transactions": len(txns),
            "row_changes": sum(len(t.changes) for t in txns),
            "large_transactions": sum(t.large for t in txns),
            "without_context": sum(t.request_id is None for t in txns),
            "rolled_back_or_lost": len(self.aborted),
            "decoy_messages_rolled_back": self.decoys,
            "writer_disconnects": self.disconnects,
        }


class _Writer:
    def __init__(self, w: Workload, index: int) -> None:
        self.w = w
        self.index = index
        self.rng = random.Random(f"{w.seed}-{index}")
        self.accounts: dict[str, dict] = {}
        self.ledger: dict[int, dict] = {}
        self.parted: dict[tuple[int, int], dict] = {}
        self.next = 0
        self.next_bulk = (index + 1) * 10**10
        self.conn: psycopg.Connection | None = None

    def run(self) -> None:
        number = 0
        while not self.w._stop.is_set():
            number += 1
            request_id = f"w{self.index}-{number}"
            if self.conn is None:
                self.conn = self._connect()
            state = (dict(self.accounts), dict(self.ledger), dict(self.parted))
            txn = None
            try:
                txn, commit = self._transaction(request_id, number)
                if commit:
                    self.conn.commit()
                else:
                    self.conn.rollback()
                    self._restore(state)
                    self.w.record(None, request_id)
                    continue
            except psycopg.OperationalError:
                self.w.disconnects += 1
                self.conn.close()
                self.conn = self._connect()
                if txn is None or not self._committed(request_id):
                    self._restore(state)
                    self.w.record(None, request_id)
                    continue
            self.w.record(txn, request_id)
            time.sleep(self.rng.uniform(0, 0.01))

    def _restore(self, state: tuple) -> None:
        self.accounts, self.ledger, self.parted = state

    def _connect(self) -> psycopg.Connection:
        deadline = time.monotonic() + 120
        while True:
            try:
                return psycopg.connect(self.w.dsn, connect_timeout=5)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _committed(self, request_id: str) -> bool:
        found = self.conn.execute("SELECT EXISTS (SELECT 1 FROM commit_marks WHERE request_id = %s)", (request_id,)).fetchone()[0]
        self.conn.rollback()
        return found

    def _message(self, request_id: str, **extra) -> None:
        self.conn.execute("SELECT pg_logical_emit_message(true, 'flux', %s)", (json.dumps({"request_id": request_id, **extra}),))

    def _transaction(self, request_id: str, number: int) -> tuple[Txn, bool]:
        rng, conn = self.rng, self.conn
        xid = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0]
        conn.execute("INSERT INTO commit_marks VALUES (%s)", (request_id,))
        mode = rng.choices(["first", "late", "none", "twice"], [5, 2, 2, 1])[0]
        txn = Txn(self.index, number, xid, None if mode == "none" else request_id, [])
        if mode in ("first", "twice"):
            self._message(request_id)
        large = rng.random() < 1 / self.w.large_every
        steps = rng.randint(1, 5)
        for step in range(steps):
            if large and step == 0:
                self._large(txn)
            elif rng.random() < 0.15:  # a savepoint rolled back: none of it may be recorded
                saved = (dict(self.accounts), dict(self.ledger), dict(self.parted), len(txn.changes))
                conn.execute("SAVEPOINT sp")
                if mode != "none" and rng.random() < 0.5:
                    self._message(f"decoy-{request_id}")
                    self.w.decoys += 1
                for _ in range(rng.randint(1, 3)):
                    self._change(txn)
                conn.execute("ROLLBACK TO SAVEPOINT sp")
                self.accounts, self.ledger, self.parted, kept = saved
                del txn.changes[kept:]
            else:
                self._change(txn)
            if mode == "late" and step == 0:
                self._message(request_id)
            if mode == "twice" and step == 0:
                self._message(request_id, again=True)
            if rng.random() < 0.05:  # held open while others commit: interleaved in the WAL
                time.sleep(rng.uniform(0.05, 0.5))
        if rng.random() < 0.05:
            conn.execute("INSERT INTO scratch (v) VALUES (%s)", (request_id,))
        return txn, rng.random() >= 0.08

    def _key(self) -> int:
        self.next += 1
        return self.index * 10**9 + self.next

    def _change(self, txn: Txn) -> None:
        rng, conn = self.rng, self.conn
        table = rng.choices(["accounts", "ledger", "parted"], [5, 2, 2])[0]
        rows = {"accounts": self.accounts, "ledger": self.ledger, "parted": self.parted}[table]
        op = rng.choices(["insert", "update", "delete"], [4, 3, 1])[0] if rows else "insert"
        if table == "accounts":
            if op == "insert":
                image = self._account(f"w{self.index}-{self._key()}")
                conn.execute("INSERT INTO accounts VALUES (%s, %s, %s, %s, %s, %s)", _account_params(image))
                self._log(txn, "accounts", "insert", {"id": image["id"]}, None, _account_json(image))
                self.accounts[image["id"]] = image
            else:
                key = rng.choice(list(rows))
                old = rows[key]
                if op == "delete":
                    conn.execute("DELETE FROM accounts WHERE id = %s", (key,))
                    self._log(txn, "accounts", "delete", {"id": key}, _account_json(old), None)
                    del rows[key]
                    return
                if rng.random() < 0.6:  # large columns untouched: unchanged TOAST in the new tuple
                    new = {**old, "balance": self._balance(), "owner": rng.choice(OWNERS)}
                    conn.execute("UPDATE accounts SET balance = %s, owner = %s WHERE id = %s", (new["balance"], new["owner"], key))
                else:
                    new = self._account(key)
                    conn.execute("UPDATE accounts SET owner = %s, balance = %s, note = %s, blob = %s, doc = %s WHERE id = %s",
                                 (*_account_params(new)[1:], key))
                self._log(txn, "accounts", "update", {"id": key}, _account_json(old), _account_json(new))
                rows[key] = new
        elif table == "ledger":  # no primary key: row_key NULL, rows told apart by their images
            if op == "insert":
                n = self._key()
                image = {"writer": self.index, "n": n, "amount": self._balance(), "memo": rng.choice(OWNERS) or "m"}
                conn.execute("INSERT INTO ledger VALUES (%(writer)s, %(n)s, %(amount)s, %(memo)s)", image)
                self._log(txn, "ledger", "insert", None, None, image)
                rows[n] = image
            else:
                n = rng.choice(list(rows))
                old = rows[n]
                if op == "delete":
                    conn.execute("DELETE FROM ledger WHERE writer = %s AND n = %s", (self.index, n))
                    self._log(txn, "ledger", "delete", None, old, None)
                    del rows[n]
                    return
                new = {**old, "amount": self._balance(), "memo": rng.choice(OWNERS) or "u"}
                conn.execute("UPDATE ledger SET amount = %s, memo = %s WHERE writer = %s AND n = %s",
                             (new["amount"], new["memo"], self.index, n))
                self._log(txn, "ledger", "update", None, old, new)
                rows[n] = new
        else:  # partitioned: published under its root's name
            if op == "insert":
                image = {"region": rng.randint(0, 2), "id": self._key(), "v": rng.choice(OWNERS) or "v"}
                conn.execute("INSERT INTO parted VALUES (%(region)s, %(id)s, %(v)s)", image)
                self._log(txn, "parted", "insert", {"region": image["region"], "id": image["id"]}, None, image)
                rows[(image["region"], image["id"])] = image
            else:
                key = rng.choice(list(rows))
                old = rows[key]
                row_key = {"region": key[0], "id": key[1]}
                if op == "delete":
                    conn.execute("DELETE FROM parted WHERE region = %s AND id = %s", key)
                    self._log(txn, "parted", "delete", row_key, old, None)
                    del rows[key]
                    return
                new = {**old, "v": "".join(rng.choices(LETTERS, k=rng.randint(1, 40)))}
                conn.execute("UPDATE parted SET v = %s WHERE region = %s AND id = %s", (new["v"], *key))
                self._log(txn, "parted", "update", row_key, old, new)
                rows[key] = new

    def _large(self, txn: Txn) -> None:
        txn.large = True
        rng = self.rng
        if rng.random() < 0.5:  # many rows from one statement
            first, count = self.next_bulk, rng.randint(10_000, 25_000)
            self.next_bulk += count
            self.conn.execute(
                "INSERT INTO bulk SELECT g, %s, jsonb_build_object('n', g) FROM generate_series(%s::bigint, %s::bigint) g",
                (self.index, first, first + count - 1))
            for g in range(first, first + count):
                self._log(txn, "bulk", "insert", {"id": g}, None, {"id": g, "w": self.index, "payload": {"n": g}})
        else:  # MB-sized values: out of line (TOAST), in text, bytea and jsonb
            key = f"w{self.index}-{self._key()}"
            image = {
                "id": key, "owner": "big", "balance": self._balance(),
                "note": "".join(rng.choices(LETTERS, k=rng.randint(1, 3) * 1_000_000)),
                "blob": rng.randbytes(rng.randint(1, 2) * 1_000_000),
                "doc": {"text": "".join(rng.choices(LETTERS, k=500_000)), "list": list(range(rng.randint(1, 50_000)))},
            }
            self.conn.execute("INSERT INTO accounts VALUES (%s, %s, %s, %s, %s, %s)", _account_params(image))
            self._log(txn, "accounts", "insert", {"id": key}, None, _account_json(image))
            self.accounts[key] = image

    def _log(self, txn: Txn, table: str, op: str, key: dict | None, old: dict | None, new: dict | None) -> None:
        txn.changes.append((table, op, key, digested(old), digested(new)))

    def _balance(self) -> Decimal:
        return Decimal(self.rng.randint(-10**8, 10**8)) / 100

    def _account(self, key: str) -> dict:
        rng = self.rng
        roll = rng.random()
        note = None if roll < 0.3 else (rng.choice(OWNERS) if roll < 0.85 else "".join(rng.choices(LETTERS, k=6000)))
        blob = None if rng.random() < 0.5 else rng.randbytes(rng.choice([3, 100, 5000]))
        doc = None if rng.random() < 0.4 else {"k": rng.choice(OWNERS), "n": rng.randint(-10**12, 10**12), "a": [1, "x", None]}
        return {"id": key, "owner": rng.choice(OWNERS), "balance": self._balance(), "note": note, "blob": blob, "doc": doc}


DIGEST_OVER = 4096  # characters of JSON: a larger value is kept (and compared) as its digest


def digested(image: dict | None) -> dict | None:
    """`image` with each large value replaced by a digest of its canonical JSON: the truth of a run
    holds gigabytes of values otherwise. Applied alike to what was written and what was recorded."""
    if image is None:
        return None
    out = {}
    for name, value in image.items():
        if isinstance(value, (str, dict, list)):
            text = json.dumps(value, sort_keys=True, default=_plain, ensure_ascii=False)
            if len(text) > DIGEST_OVER:
                value = f"sha256:{hashlib.sha256(text.encode()).hexdigest()}:{len(text)}"
        out[name] = value
    return out


def _account_params(image: dict) -> tuple:
    doc = None if image["doc"] is None else json.dumps(image["doc"])
    return image["id"], image["owner"], image["balance"], image["note"], image["blob"], doc


def _account_json(image: dict) -> dict:
    """The image as the log records it: bytea as `\\x` hex text."""
    blob = image["blob"]
    return {**image, "blob": None if blob is None else "\\x" + blob.hex()}


def read_log(dsn: str) -> dict[int, list[dict]]:
    """flux.state_mutations grouped by xid, each group in (commit_lsn, seq) order."""
    query = ("SELECT xid, commit_lsn::text, seq, request_id, table_name, op, row_key::text, old::text, new::text,"
             " context->>'request_id' FROM flux.state_mutations ORDER BY commit_lsn, seq")
    load = lambda text: None if text is None else json.loads(text, parse_float=Decimal)  # noqa: E731
    out: dict[int, list[dict]] = defaultdict(list)
    with psycopg.connect(dsn) as conn, conn.cursor(name="log") as cur:
        cur.itersize = 5000
        cur.execute(query)
        for xid, lsn, seq, rid, table, op, key, old, new, ctx_rid in cur:
            out[int(xid)].append({"commit_lsn": lsn, "seq": seq, "request_id": rid, "context_request_id": ctx_rid,
                                  "table": table, "op": op, "row_key": load(key), "old": digested(load(old)), "new": digested(load(new))})
    return out


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def compare(dsn: str, w: Workload) -> dict[str, list]:
    """What differs between the log and the truth, by kind of defect (empty lists: none)."""
    log = read_log(dsn)
    problems: dict[str, list] = {k: [] for k in (
        "lost transactions", "lost changes", "duplicated changes", "recorded but never committed",
        "wrong request_id", "wrong images", "split across commit_lsn", "out of commit order", "decoy context recorded")}
    for xid, rows in log.items():
        txn = w.committed.get(xid)
        if txn is None:
            problems["recorded but never committed"].append({"xid": xid, "rows": len(rows), "first": _short(rows[0])})
            continue
        if len({r["commit_lsn"] for r in rows}) > 1:
            problems["split across commit_lsn"].append({"xid": xid, "request": f"w{txn.writer}-{txn.number}"})
        if any((r["request_id"] or "").startswith("decoy-") or (r["context_request_id"] or "").startswith("decoy-") for r in rows):
            problems["decoy context recorded"].append(f"w{txn.writer}-{txn.number}")
    for xid, txn in w.committed.items():
        if not txn.changes:
            continue
        name = f"w{txn.writer}-{txn.number}"
        rows = log.get(xid)
        if rows is None:
            problems["lost transactions"].append({"request": name, "changes": len(txn.changes), "large": txn.large})
            continue
        want = Counter(_change_key(c) for c in txn.changes)
        have = Counter(_change_key((r["table"], r["op"], r["row_key"], r["old"], r["new"])) for r in rows)
        if len(rows) > len(txn.changes) or want - have or have - want:
            lost, extra = want - have, have - want
            if lost and len(rows) < len(txn.changes):
                problems["lost changes"].append({"request": name, "want": len(txn.changes), "have": len(rows)})
            elif len(rows) > len(txn.changes):
                problems["duplicated changes"].append({"request": name, "want": len(txn.changes), "have": len(rows)})
            else:
                problems["wrong images"].append({"request": name, "first_wrong": str(next(iter(extra or lost)))[:400]})
            continue
        got = [(r["table"], r["op"], r["row_key"], r["old"], r["new"]) for r in rows]
        if got != [tuple(c) for c in txn.changes] or [r["seq"] for r in rows] != list(range(len(rows))):
            problems["wrong images"].append({"request": name, "detail": "order or seq"})
        bad = [r for r in rows if r["request_id"] != txn.request_id or r["context_request_id"] != txn.request_id]
        if bad:
            problems["wrong request_id"].append({"request": name, "want": txn.request_id, "got": sorted({str(r["request_id"]) for r in bad}),
                                                 "rows": len(bad), "of": len(rows)})
    last: dict[int, tuple[int, str]] = {}
    for txn in sorted(w.committed.values(), key=lambda t: (t.writer, t.number)):
        rows = log.get(txn.xid % 2**32)
        if not rows:
            continue
        lsn = _lsn(rows[0]["commit_lsn"])
        if txn.writer in last and lsn <= last[txn.writer][0]:
            problems["out of commit order"].append({"request": f"w{txn.writer}-{txn.number}", "after": last[txn.writer][1]})
        last[txn.writer] = (lsn, f"w{txn.writer}-{txn.number}")
    return {k: v for k, v in problems.items() if v}


def _change_key(change: tuple) -> str:
    return json.dumps(change, sort_keys=True, default=_plain)


def _plain(value: object) -> str:
    """A Decimal as its value: numeric(14,2) records 12.50 for the 12.5 written."""
    return format(value.normalize(), "f") if isinstance(value, Decimal) else str(value)


def _short(row: dict) -> dict:
    return {k: (str(v)[:200] if k in ("old", "new") else v) for k, v in row.items()}
