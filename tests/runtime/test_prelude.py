"""The prelude's half of the contract, seen from a function: what it returns, logs and schedules.
Real V8, through the executor (`run1`)."""

from __future__ import annotations

from tests.functions import write_project
from tests.runtime.test_executor import run1


def test_an_object_with_to_json_is_returned_as_json_stringify_writes_it(tmp_path):
    write_project(tmp_path, {"money": """
        class Money { constructor(cents) { this.cents = cents; } toJSON() { return {amount: this.cents / 100}; } }
        export default async function () {
          return {status: 200, body: {price: new Money(250), at: new Date(0)}};
        }
    """})
    assert run1(tmp_path, "money").body == {"price": {"amount": 2.5}, "at": "1970-01-01T00:00:00.000Z"}


def test_to_json_runs_once_per_value(tmp_path):
    write_project(tmp_path, {"count": """
        export default async function () {
          let calls = 0;
          const body = {value: {toJSON() { calls++; return calls; }}};
          return {status: 200, body};
        }
    """})
    assert run1(tmp_path, "count").body == {"value": 1}


def test_what_a_to_json_returns_must_be_json_too(tmp_path):
    write_project(tmp_path, {"bad": "export default async function () { return {status: 200, body: {x: {toJSON() { return new Map(); }}}}; }"})
    result = run1(tmp_path, "bad")
    assert result.status == 500 and "the return value's body.x is a Map, which JSON cannot represent" in result.error


def logs(result) -> list[dict]:
    return [e["attributes"] for e in result.spans[0]["events"] if e["name"] == "log"]


def test_console_writes_an_error_as_its_name_message_stack_and_fields(tmp_path):
    write_project(tmp_path, {"log": """
        export default async function () {
          const err = new Error("boom"); err.code = "E1";
          console.error(err);
          return {status: 200};
        }
    """})
    [log] = logs(run1(tmp_path, "log"))
    assert log == {"message": 'Error: boom\n    at default (functions/log.js:2:15) {"code":"E1"}', "level": "error"}


def test_logging_a_value_that_cannot_be_read_writes_its_string_and_never_throws(tmp_path):
    write_project(tmp_path, {"log": """
        export default async function () {
          console.log("seen", new Proxy(new Error("x"), {ownKeys() { throw new Error("no keys"); }}));
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "log")
    assert result.status == 200 and logs(result) == [{"message": "seen Error: x", "level": "log"}]


def test_ctx_log_keeps_an_error_as_its_exception_attributes(tmp_path):
    write_project(tmp_path, {"log": """
        export default async function (req, ctx) {
          ctx.log("charge failed", new TypeError("card declined"));
          return {status: 200};
        }
    """})
    [log] = logs(run1(tmp_path, "log"))
    assert log == {"message": "charge failed", "exception.type": "TypeError", "exception.message": "card declined",
                   "exception.stacktrace": "TypeError: card declined\n    at default (functions/log.js:2:28)"}


def test_attributes_never_override_the_log_message(tmp_path):
    write_project(tmp_path, {"log": """
        export default async function (req, ctx) {
          ctx.log("charged", {message: "from the attributes", id: 7});
          return {status: 200};
        }
    """})
    assert logs(run1(tmp_path, "log")) == [{"message": "charged", "attributes.message": "from the attributes", "id": 7}]


def test_a_ctx_call_rejection_nothing_took_up_is_logged_when_the_handler_finishes(tmp_path):
    write_project(tmp_path, {"unhandled": """
        export default async function (req, ctx) {
          ctx.db.query("SELECT 'left alone'");                          // no database: each call rejects
          ctx.db.query("SELECT 'caught'").catch(() => {});
          try { await ctx.db.query("SELECT 'awaited'"); } catch (e) {}
          await new Promise((resolve) => setTimeout(resolve, 10));      // the first two have failed by now
          return {status: 200};
        }
    """})
    [log] = logs(run1(tmp_path, "unhandled"))  # the first call's only
    assert log["message"] == f"Unhandled promise rejection: {log['exception.type']}: {log['exception.message']}"
    assert log["level"] == "error" and "functions/unhandled.js:2:" in log["exception.stacktrace"]


def test_a_cleared_timer_does_not_count_against_the_pending_limit(tmp_path):
    write_project(tmp_path, {"timers": """
        export default async function () {
          for (let i = 0; i < 1001; i++) clearTimeout(setTimeout(() => {}, 60000));
          return {status: 200, body: "all cleared"};
        }
    """})
    result = run1(tmp_path, "timers")
    assert (result.status, result.body) == (200, "all cleared")


def test_set_interval_is_not_there_like_any_other_missing_global(tmp_path):
    write_project(tmp_path, {"interval": """
        export default async function () {
          try { setInterval(() => {}, 10); } catch (e) { return {status: 200, body: [typeof setInterval, e.name]}; }
        }
    """})
    assert run1(tmp_path, "interval").body == ["undefined", "ReferenceError"]


def test_an_int8_past_numbers_safe_range_is_the_bigint_of_its_exact_value(tmp_path, dsn):
    write_project(tmp_path, {"ids": """
        export default async function (req, ctx) {
          const { rows: [row] } = await ctx.db.query(`SELECT 9007199254740991::int8 AS max_safe, 9007199254740992::int8 AS two53,
            9007199254740993::int8 AS above, '-9223372036854775808'::int8 AS lo, 9223372036854775807::int8 AS hi,
            -9007199254740991::int8 AS min_safe, ARRAY[9007199254740993, NULL, 5]::int8[] AS a,
            '{{1,-9007199254740993},{NULL,9223372036854775807}}'::int8[] AS nested, (2 ^ 62)::int8 AS power,
            '{"n": 9007199254740993}'::jsonb AS j`);
          const shown = (v) => Array.isArray(v) ? v.map(shown) : v === null ? null : `${typeof v} ${String(v)}`;
          return {status: 200, body: Object.fromEntries(Object.entries(row).map(([k, v]) => [k, k === "j" ? shown(v.n) : shown(v)]))};
        }
    """})
    result = run1(tmp_path, "ids", dsn=dsn)
    assert result.status == 200, result.error
    assert result.body == {
        "max_safe": "number 9007199254740991", "two53": "bigint 9007199254740992", "above": "bigint 9007199254740993",
        "lo": "bigint -9223372036854775808", "hi": "bigint 9223372036854775807", "min_safe": "number -9007199254740991",
        "a": ["bigint 9007199254740993", None, "number 5"],
        "nested": [["number 1", "bigint -9007199254740993"], [None, "bigint 9223372036854775807"]],
        "power": "bigint 4611686018427387904",
        "j": "number 9007199254740992",  # a json value's number is what JSON.parse makes of it
    }


def test_a_bigint_id_from_a_result_finds_its_own_row_again(tmp_path, dsn, conn):
    # 1234567890123456800 is the double nearest 1234567890123456789: a rounded id would update it.
    conn.execute("CREATE TABLE items (id int8 PRIMARY KEY, v text); INSERT INTO items VALUES (1234567890123456789, 'a'), (1234567890123456800, 'b')")
    conn.commit()
    write_project(tmp_path, {"touch": """
        export default async function (req, ctx) {
          const { rows: [row] } = await ctx.db.query("SELECT id FROM items WHERE v = 'a'");
          const updated = await ctx.db.query("UPDATE items SET v = 'touched' WHERE id = $1", [row.id]);
          const many = await ctx.db.query("SELECT count(*) AS n FROM items WHERE id = ANY($1::int8[])", [[String(row.id)]]);
          return {status: 200, body: {updated: updated.rowCount, n: many.rows[0].n}};
        }
    """})
    result = run1(tmp_path, "touch", dsn=dsn)
    assert (result.status, result.body) == (200, {"updated": 1, "n": 1}), result.error
    assert conn.execute("SELECT id, v FROM items ORDER BY id").fetchall() == [(1234567890123456789, "touched"), (1234567890123456800, "b")]


def test_a_bigint_in_the_response_body_is_a_500_that_says_to_convert_it(tmp_path, dsn):
    write_project(tmp_path, {"send": """
        export default async function (req, ctx) {
          const { rows } = await ctx.db.query("SELECT 1234567890123456789::int8 AS id");
          return {status: 200, headers: {"x-id": rows[0].id}, body: {items: [{id: rows[0].id}]}};
        }
    """})
    result = run1(tmp_path, "send", dsn=dsn)
    assert result.status == 500
    assert result.error == ("NonSerializableReturn: the return value's body.items[0].id is a BigInt, which JSON cannot represent: "
                            "convert it with String() to send its exact digits")


def test_a_bigint_header_is_sent_as_its_digits(tmp_path):
    write_project(tmp_path, {"head": "export default async function () { return {status: 200, headers: {'x-id': 1234567890123456789n, 'x-n': [1n, 2]}}; }"})
    result = run1(tmp_path, "head")
    assert (result.status, result.headers) == (200, [("x-id", "1234567890123456789"), ("x-n", "1"), ("x-n", "2")]), result.error


def test_logging_a_bigint_writes_it_as_node_does_and_never_throws(tmp_path, dsn):
    write_project(tmp_path, {"log": """
        export default async function (req, ctx) {
          const { rows: [row] } = await ctx.db.query("SELECT 1234567890123456789::int8 AS id, ARRAY[-9007199254740993]::int8[] AS a, 'x' AS s");
          console.log("row", row, 5n);
          const err = new Error("boom"); err.id = row.id;
          console.error(err);
          ctx.log("charged", {id: row.id, a: row.a});
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "log", dsn=dsn)
    assert result.status == 200, result.error
    assert logs(result) == [
        {"message": 'row {"id":1234567890123456789n,"a":[-9007199254740993n],"s":"x"} 5n', "level": "log"},
        {"message": 'Error: boom\n    at default (functions/log.js:4:15) {"id":1234567890123456789n}', "level": "error"},
        {"message": "charged", "id": "1234567890123456789", "a": ["-9007199254740993"]},  # attributes: their exact digits
    ]

