"""Memory outside V8's heap (ArrayBuffers, WebAssembly memory) against the isolate's memory limit, in real V8."""

from __future__ import annotations

import pytest

from flux.project import load_project
from flux.runtime.external import WATCH
from flux.runtime.isolate import compile_function
from tests.functions import write_project
from tests.runtime.test_executor import execute


def test_the_watch_is_found_in_the_pinned_mini_racer():
    """Without it a function's ArrayBuffers would have no limit: say so here, not in an outage."""
    assert WATCH is not None


# Each keeps 16 blocks of 16 MB (256 MB) under a 32 MB limit; before the watch, all of them answered 200.
BOMBS = {
    "typed arrays": "const b = new Uint8Array(16 << 20); b.fill(1); kept.push(b);",
    "array buffers": "const b = new ArrayBuffer(16 << 20); new Uint8Array(b).fill(1); kept.push(b);",
    "a resizable buffer": "const b = new ArrayBuffer(0, {maxByteLength: 1 << 30}); b.resize(16 << 20); new Uint8Array(b).fill(1); kept.push(b);",
    "webassembly memory": "kept[0] ??= new WebAssembly.Memory({initial: 1}); kept[0].grow(256); new Uint8Array(kept[0].buffer).fill(1);",
}


# A time limit far past what these take (about 0.1 s): filling 256 MB on a starved CI machine
# outran a 1 s limit, a 504 where the memory limit is what is under test.
ROOMY = '[limits]\ntimeout_ms = 10000\nmemory_mb = 32\n'


@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_memory_outside_the_js_heap_counts_against_the_limit(tmp_path, bomb):
    write_project(tmp_path, {"bomb": f"""
        export default async function (req) {{
          if (req.body === "bomb") {{
            const kept = [];
            for (let i = 0; i < 16; i++) {{ {bomb} }}
            return {{status: 200, body: "allocated 256 MB"}};
          }}
          return {{status: 200, body: "fine"}};
        }}
    """}, ROOMY)
    bombed, after = execute(tmp_path, "bomb", "bomb"), execute(tmp_path, "bomb", "ok")
    assert (bombed[0].status, bombed[0].error) == (500, "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)")
    assert (after[0].status, after[0].body) == (200, "fine")


def test_buffers_a_function_no_longer_holds_do_not_count(tmp_path):
    """The limit is on what is live at a collection, not on what was ever allocated."""
    write_project(tmp_path, {"churn": """
        export default async function () {
          let made = 0;
          for (let i = 0; i < 32; i++) { new Uint8Array(8 << 20).fill(1); made += 8; }
          return {status: 200, body: made};
        }
    """}, ROOMY)
    [result] = execute(tmp_path, "churn")
    assert (result.status, result.body) == (200, 256)  # 8 times the limit, over the request


def test_a_buffer_bomb_after_the_handler_returned_is_a_memory_error(tmp_path):
    write_project(tmp_path, {"later": """
        export default async function () {
          const kept = [];
          (async () => { await null; for (let i = 0; i < 16; i++) { const b = new Uint8Array(16 << 20); b.fill(1); kept.push(b); } })();
          return {status: 200};
        }
    """}, ROOMY)
    [result] = execute(tmp_path, "later")
    assert (result.status, result.error) == (500, "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)")


def test_kept_intl_formatters_count_against_the_limit(tmp_path):
    """ICU's objects live outside V8's heap: 300,000 kept formatters held 1.2 GB under a 64 MB limit."""
    write_project(tmp_path, {"formats": """
        export default async function () {
          const kept = [];
          for (let i = 0; i < 20000; i++) kept.push(new Intl.DateTimeFormat("en-US", {timeZone: i % 2 ? "UTC" : "Europe/Paris"}));
          return {status: 200, body: kept.length};
        }
    """}, ROOMY)  # a formatter takes up to 0.3 ms to make
    [result] = execute(tmp_path, "formats")
    assert (result.status, result.error) == (500, "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)")


def test_intl_objects_keep_their_behaviour(tmp_path):
    write_project(tmp_path, {"intl": """
        class Money extends Intl.NumberFormat { euros(n) { return this.format(n); } }
        export default async function () {
          return {status: 200, body: [
            Intl.DateTimeFormat("en-US", {timeZone: "UTC"}).format(0),
            new Intl.DateTimeFormat() instanceof Intl.DateTimeFormat,
            new Intl.Collator().constructor === Intl.Collator,
            new Money("de-DE", {style: "currency", currency: "EUR"}).euros(1.5),
            new Date(0).toLocaleDateString("en-US", {timeZone: "UTC"}),
            (1234.5).toLocaleString("de-DE"),
            [...new Intl.Segmenter("en", {granularity: "word"}).segment("hi there")].length,
            [Intl.Segmenter.prototype.segment.length, Date.prototype.toLocaleString.name],
            (() => { try { return Intl.PluralRules("en"); } catch (e) { return e.name; } })(),
          ]};
        }
    """})
    [result] = execute(tmp_path, "intl")
    assert result.body == ["1/1/1970", True, True, "1,50\xa0€", "1/1/1970", "1.234,5", 3, [1, "toLocaleString"], "TypeError"]


def test_top_level_code_past_the_limit_is_a_load_error(tmp_path):
    write_project(tmp_path, {"heavy": """
        const kept = [];
        for (let i = 0; i < 16; i++) { const b = new Uint8Array(16 << 20); b.fill(1); kept.push(b); }
        export default async function () { return {status: 200, body: kept.length}; }
    """}, ROOMY)
    compiled = compile_function(load_project(tmp_path).functions["heavy"], memory_mb=32)
    assert compiled.error == "functions/heavy.js: its top-level code exceeded the memory limit (32 MB)"
