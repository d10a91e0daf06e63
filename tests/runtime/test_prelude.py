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
