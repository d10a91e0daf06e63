"""A seeded generator of JS functions for the replay check (tests/runtime/test_replay_fuzz.py).

Each function mixes what can make a request non-deterministic: ctx.db and ctx.fetch calls that
succeed, fail or time out, against a stub whose delays are random per run (`/jitter`), awaited or
not, under Promise.all / race / allSettled / any; timers set and cleared; nested ctx.step calls
that may throw; clock, Math.random and crypto reads between awaits and inside callbacks; and
microtask chains. Everything the function observes is pushed, in the order it saw it, onto `out`,
the response's body: a replay that saw anything else, or in another order, answers otherwise.

The seed fixes the function's text, not what it sees: the delays, the database's answers and so
the order in which results settle change from run to run.
"""

from __future__ import annotations

import random

SCHEMA = "CREATE TABLE fz (id serial PRIMARY KEY, v text)"

_PRELUDE = """\
const loaded = [Date.now(), Math.random(), String(new Date())]; // top-level code runs in each request's fresh realm
export default async function (req, ctx) {
  const out = [["loaded", loaded]];
  const kept = {}; // timers and promises kept for later statements (a step's are seen after it too)
  const note = (tag, value) => { out.push([tag, value === undefined ? null : value]); };
  const err = (e) => (e instanceof Error ? ["err", e.name, e.message, e.timeout ?? null, e.sqlstate ?? null,
                                            (e.errors || []).map((x) => x && x.message)] : ["thrown", String(e)]);
"""


def _noted(pad: str, tag: str, expr: str) -> str:
    """A statement noting what `expr` gives, or the error it throws."""
    return f'{pad}try {{ note("{tag}", {expr}); }} catch (e) {{ note("{tag}", err(e)); }}'


class FunctionGenerator:
    def __init__(self, seed: int, stub_url: str) -> None:
        self.r = random.Random(seed)
        self.url = stub_url
        self.n = 0
        self.held: list[str] = []  # promises made earlier, for a later await
        self.timers: list[str] = []  # handles of timers set, for a later clearTimeout

    def source(self) -> str:
        lines = [_PRELUDE]
        lines += self.block("ctx", 1, self.r.randint(3, 8))
        if self.r.random() < 0.1:
            lines.append(f"  throw new Error('failed at ' + {self.read()});")
        lines.append("  return {status: 200, body: out};\n}\n")
        return "\n".join(lines)

    def tag(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def read(self) -> str:
        """A synchronous read of something non-deterministic."""
        return self.r.choice([
            "Date.now()", "new Date().toISOString()", "Math.random()", "crypto.randomUUID()",
            "Array.from(crypto.getRandomValues(new Uint8Array(2)))", "Date()",
            "new Intl.DateTimeFormat('en-US', {timeZone: 'UTC', timeStyle: 'medium'}).format()",
            "Array.from(crypto.getRandomValues(new Uint16Array(1)))",
        ])

    def read_number(self) -> str:
        return self.r.choice(["Date.now()", "Math.random() * 4", "crypto.getRandomValues(new Uint8Array(1))[0]"])

    def atom(self, c: str) -> str:
        """A JS expression: a Promise of a JSON value, or one that rejects."""
        r = self.r
        k = r.randint(1, 999)
        kind = r.choices(["db", "db_write", "db_fail", "db_timeout", "db_values", "db_refused", "fetch", "fetch_status", "fetch_timeout",
                          "fetch_refused", "fetch_post", "fetch_bytes", "fetch_many", "fetch_inspect", "timer",
                          "timer_reject", "micro", "chained", "throwing", "clearing", "step"],
                         [4, 2, 1, 0.5, 1, 0.3, 5, 1.5, 2, 1, 1, 1, 0.3, 1, 3, 1, 1.5, 2, 1, 1, 1])[0]
        if kind == "db":
            return (f'{c}.db.query("SELECT $1::int AS n, random() AS r, clock_timestamp()::text AS at, '
                    f'pg_sleep(random() * $2)::text AS s", [{k}, {r.choice([0, 0.005, 0.02])}]).then((q) => q.rows[0])')
        if kind == "db_write":
            return f'{c}.db.query("INSERT INTO fz (v) VALUES ($1) RETURNING id, v", [String({self.read()})]).then((q) => q.rows)'
        if kind == "db_fail":
            return f'{c}.db.query("SELECT 1 / ($1::int - $1::int) AS x", [{k}]).then((q) => q.rows)'
        if kind == "db_timeout":
            return (f'{c}.db.query("SELECT set_config(\'statement_timeout\', \'20\', true)")'
                    f'.then(() => {c}.db.query("SELECT pg_sleep(0.1)")).then((q) => q.rowCount)')
        if kind == "db_values":
            return (f'{c}.db.query("SELECT $1::timestamptz::text AS d, $2::numeric * 2 AS b, $3::jsonb AS j, gen_random_uuid() AS u, '
                    f'ceil(-random() * 0.9)::float8 AS nz, ARRAY[random(), -0.0::float8] AS a", '
                    f'[new Date(), BigInt({k}) ** 3n, {{z: Math.random(), a: [Date.now()]}}])'
                    f'.then((q) => [q.rows[0], Object.is(q.rows[0].nz, -0), Object.is(q.rows[0].a[1], -0)])')
        if kind == "db_refused":  # refused by the host before PostgreSQL sees it: a statement that would end the transaction
            return f'{c}.db.query("COMMIT").then((q) => q.rowCount)'
        if kind == "fetch_post":
            return (f'{c}.fetch("{self.url}/echo", {{method: "POST", body: JSON.stringify({{r: {self.read()}}}), '
                    f'headers: {{"x-at": String(Date.now())}}}}).then((res) => res.json())')
        if kind == "fetch_bytes":
            return (f'{c}.fetch("{self.url}/mirror", {{method: "PUT", body: crypto.getRandomValues(new Uint8Array({r.randint(1, 9)}))}})'
                    f'.then(async (res) => Array.from(await res.bytes()))')
        if kind == "fetch_many":
            return (f'Promise.all(Array.from({{length: {r.randint(14, 20)}}}, (_, i) => {c}.fetch("{self.url}/jitter?max=8&i=" + i, '
                    f'{{timeout_ms: {r.choice([20, 60, 500])}}}).then((res) => res.status, (e) => e.name)))')
        if kind == "fetch_inspect":
            return (f'{c}.fetch("{self.url}/{r.choice(["jitter?max=10", "headers", "bytes", "gzip", "empty", "chunked"])}")'
                    f'.then(async (res) => [res.status, res.url, res.headers.get("date"), [...res.headers].length, '
                    f'(await res.bytes()).length, (await res.text()).length, res.headers.getSetCookie().length])')
        if kind == "throwing":
            return f'{self.atom(c)}.then((v) => {{ if ({self.read_number()} % 2 < 1) throw new TypeError("callback threw"); return v; }})'
        if kind == "clearing":
            if not self.timers:
                return self.atom(c)
            return f'{self.atom(c)}.then((v) => {{ clearTimeout({r.choice(self.timers)}); return v; }})'
        if kind == "step":
            t = self.tag()
            return f'{c}.step("{t}", async (s{self.n}) => {self.atom(f"s{self.n}")})'
        if kind == "fetch":
            return f'{c}.fetch("{self.url}/jitter?max={r.choice([0, 5, 20, 40])}&k={k}").then((res) => res.json())'
        if kind == "fetch_status":
            return (f'{c}.fetch("{self.url}/jitter?max=10&status={r.choice([404, 500, 503])}")'
                    f'.then(async (res) => [res.status, res.ok, res.statusText, await res.text()])')
        if kind == "fetch_timeout":
            return f'{c}.fetch("{self.url}/jitter?max=60&k={k}", {{timeout_ms: {r.choice([15, 30, 45])}}}).then((res) => res.json())'
        if kind == "fetch_refused":
            return f'{c}.fetch("http://127.0.0.1:9/x").then((res) => res.status)'
        if kind == "timer":
            return f'new Promise((res) => setTimeout(res, {r.choice([0, 0, 1, 5, 15, 30])}, "{self.tag()}"))'
        if kind == "timer_reject":
            return f'new Promise((_, rej) => setTimeout(() => rej(new RangeError("late " + {self.read()})), {r.choice([0, 3, 20])}))'
        if kind == "micro":
            t = self.tag()
            return f'Promise.resolve().then(() => {self.read()}).then((v) => {{ note("{t}", v); return {self.read()}; }})'
        inner = self.atom(c)
        t = self.tag()
        return f'{inner}.then((v) => {{ note("{t}", {self.read()}); return v; }})'

    def block(self, c: str, depth: int, count: int) -> list[str]:
        lines: list[str] = []
        for _ in range(count):
            lines += self.statement(c, depth)
        return lines

    def statement(self, c: str, depth: int) -> list[str]:
        r = self.r
        pad = "  " * depth
        t = self.tag()
        kinds = ["await", "unawaited", "dropped", "all", "race", "allSettled", "any", "read", "timer", "clear",
                 "hold", "await_held", "microtask", "iife", "timer_call", "concurrent_steps", "for_await", "stuck", "spin", "hog"]
        weights = [4, 2, 1, 1.5, 1.5, 1.5, 1, 2, 1.5, 1, 1, 1, 1, 1, 1, 0.7, 0.5, 0.04, 0.03, 0.03]
        if depth < 3:
            kinds.append("step")
            weights.append(2)
        kind = r.choices(kinds, weights)[0]
        if kind == "await":
            return [_noted(pad, t, f"await {self.atom(c)}")]
        if kind == "unawaited":
            return [f'{pad}{self.atom(c)}.then((v) => note("{t}", v), (e) => note("{t}", err(e)));']
        if kind == "dropped":
            return [f'{pad}{self.atom(c)}.catch(() => {{}});']
        if kind in ("all", "race", "allSettled", "any"):
            parts = ", ".join(self.atom(c) for _ in range(r.randint(2, 4)))
            shape = ('.then((s) => s.map((x) => (x.status === "fulfilled" ? ["ok", x.value] : ["no", err(x.reason)])))'
                     if kind == "allSettled" else "")
            return [_noted(pad, t, f"await Promise.{kind}([{parts}]){shape}")]
        if kind == "read":
            return [f'{pad}note("{t}", {self.read()});']
        if kind == "timer":
            handle = f"kept.h{self.n}"
            self.timers.append(handle)
            return [f'{pad}{handle} = setTimeout(() => note("{t}", {self.read()}), {r.choice([0, 1, 5, 20])});']
        if kind == "clear":
            if not self.timers:
                return [f'{pad}clearTimeout(setTimeout(() => note("{t}", "never"), 0));']
            return [f'{pad}clearTimeout({r.choice(self.timers)});']
        if kind == "hold":
            name = f"kept.p{self.n}"
            self.held.append(name)
            return [f'{pad}{name} = {self.atom(c)}; {name}.catch(() => {{}});']
        if kind == "await_held":
            if not self.held:
                return [f'{pad}note("{t}", await null);']
            return [_noted(pad, t, f"await {r.choice(self.held)}")]
        if kind == "microtask":
            return [f'{pad}queueMicrotask(() => note("{t}a", {self.read()}));',
                    f'{pad}Promise.resolve().then(() => note("{t}b", {self.read()})).then(() => note("{t}c", {self.read()}));']
        if kind == "timer_call":
            return [f'{pad}setTimeout(() => {{ note("{t}", {self.read()}); {self.atom(c)}.then((v) => note("{t}", v), (e) => note("{t}", err(e))); }}, '
                    f'{r.choice([0, 2, 10])});']
        if kind == "concurrent_steps":
            steps = ", ".join(f'{c}.step("{t}.{i}", async (s) => {{ note("{t}.{i}", {self.read()}); return await {self.atom("s")}; }})'
                              for i in range(r.randint(2, 3)))
            return [_noted(pad, t, f"await Promise.all([{steps}])")]
        if kind == "for_await":
            parts = ", ".join(self.atom(c) for _ in range(r.randint(2, 3)))
            return [f'{pad}try {{ for await (const x of [{parts}]) note("{t}", [x, {self.read()}]); }} catch (e) {{ note("{t}", err(e)); }}']
        if kind == "stuck":  # a Promise nothing settles: the request ends, its tape up to there
            return [f'{pad}await new Promise(() => {{}});']
        if kind == "spin":  # the time or memory limit stops it mid-loop, past the tape's 10,000 events
            return [f'{pad}for (;;) {{ note("{t}", {self.read()}); if (out.length > 20000) out.length = 0; }}']
        if kind == "hog":  # the memory limit stops a microtask, with the function's calls and timers pending
            return [f'{pad}Promise.resolve().then(() => {{ note("{t}", {self.read()}); const heap = []; '
                    f'for (;;) heap.push(new Array(100000).fill(heap.length)); }});']
        if kind == "iife":
            return [f'{pad}(async () => {{ await null; note("{t}", {self.read()}); note("{t}", await {self.atom(c)}); }})()'
                    f'.catch((e) => note("{t}", err(e)));']
        # a step, nested, that may throw
        inner = f"c{self.n}"
        body = self.block(inner, depth + 1, r.randint(1, 3))
        if r.random() < 0.25:
            body.append(f'{pad}  throw new Error("step {t} failed at " + {self.read()});')
        head = f'{pad}try {{ note("{t}", await {c}.step("{t}", async ({inner}) => {{'
        tail = f'{pad}  return {self.read()};\n{pad}}})); }} catch (e) {{ note("{t}", err(e)); }}'
        return [head, *body, tail]
