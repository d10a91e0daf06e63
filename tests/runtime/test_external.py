"""Memory outside V8's heap (ArrayBuffers, WebAssembly memory) against the isolate's memory limit, in real V8."""

from __future__ import annotations

import pytest

from flux.runtime.external import WATCH
from tests.functions import write_project
from tests.runtime.test_executor import FAST, execute


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
    """}, FAST)
    bombed, after = execute(tmp_path, "bomb", "bomb"), execute(tmp_path, "bomb", "ok")
    assert (bombed[0].status, bombed[0].error) == (500, "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)")
    assert (after[0].status, after[0].body) == (200, "fine")


def test_buffers_a_function_no_longer_holds_do_not_count(tmp_path):
    """The limit is on what is live at a collection, not on what was ever allocated."""
    write_project(tmp_path, {"churn": """
        export default async function () {
          let made = 0;
          for (let i = 0; i < 64; i++) { new Uint8Array(8 << 20).fill(1); made += 8; }
          return {status: 200, body: made};
        }
    """}, FAST)
    [result] = execute(tmp_path, "churn")
    assert (result.status, result.body) == (200, 512)


def test_a_buffer_bomb_after_the_handler_returned_is_a_memory_error(tmp_path):
    write_project(tmp_path, {"later": """
        export default async function () {
          const kept = [];
          (async () => { await null; for (let i = 0; i < 16; i++) { const b = new Uint8Array(16 << 20); b.fill(1); kept.push(b); } })();
          return {status: 200};
        }
    """}, FAST)
    [result] = execute(tmp_path, "later")
    assert (result.status, result.error) == (500, "MemoryLimitExceeded: the function exceeded its memory limit (32 MB)")
