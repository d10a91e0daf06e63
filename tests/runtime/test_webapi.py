"""The Web APIs of flux/runtime/webapi.js as a function sees them, in real V8: TextEncoder and
TextDecoder, atob and btoa, structuredClone, queueMicrotask, DOMException.

tests/data/webapi/cases.json holds Node.js's own answers for random inputs; its generate.js
regenerates it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.functions import Stub, write_project
from tests.runtime.test_executor import run1

CASES_TEXT = (Path(__file__).parent.parent / "data" / "webapi" / "cases.json").read_text()
CASES = json.loads(CASES_TEXT)


def _run(tmp_path: Path, body_js: str, *, with_cases: bool = False, body: Any = None) -> Any:
    """The body a function returns whose handler body is `body_js` (CASES in scope if asked)."""
    source = (f"const CASES = {CASES_TEXT};\n" if with_cases else "") + (
        f"export default async function (req, ctx) {{\n{body_js}\n}}\n")
    write_project(tmp_path, {"w": source})
    result = run1(tmp_path, "w", body)
    assert result.status == 200, result.error
    return result.body


def _mismatches(cases: list[dict], got: list[dict]) -> list[dict]:
    return [{**case, "got": actual} for case, actual in zip(cases, got, strict=True)
            if any(actual[k] != case[k] for k in actual)]


def test_text_decoder_matches_node_whole_streamed_fatal_and_ignoring_the_bom(tmp_path):
    got = _run(tmp_path, """
      const bytes = (list) => Uint8Array.from(list);
      return {status: 200, body: CASES.decode.map((c) => {
        const streaming = new TextDecoder(c.encoding);
        const streamed = streaming.decode(bytes(c.bytes.slice(0, c.split)), {stream: true}) +
          streaming.decode(bytes(c.bytes.slice(c.split)));
        let fatal;
        try { fatal = new TextDecoder(c.encoding, {fatal: true}).decode(bytes(c.bytes)); }
        catch (e) { fatal = e instanceof TypeError ? null : String(e); }
        return {whole: new TextDecoder(c.encoding).decode(bytes(c.bytes)), streamed, fatal,
                ignoreBOM: new TextDecoder(c.encoding, {ignoreBOM: true}).decode(bytes(c.bytes))};
      })};
    """, with_cases=True)
    assert _mismatches(CASES["decode"], got) == []


def test_atob_matches_node_for_padding_whitespace_and_invalid_input(tmp_path):
    got = _run(tmp_path, """
      return {status: 200, body: CASES.atob.map((c) => {
        try { return {output: atob(c.input)}; }
        catch (e) { return {output: e.name === "InvalidCharacterError" && e instanceof DOMException ? null : String(e)}; }
      })};
    """, with_cases=True)
    assert _mismatches(CASES["atob"], got) == []


def test_btoa_encode_and_encode_into_match_node(tmp_path):
    got = _run(tmp_path, """
      return {status: 200, body: CASES.text.map((c) => {
        let base64;
        try { base64 = btoa(c.input); } catch (e) { base64 = e.name === "InvalidCharacterError" ? null : String(e); }
        const out = new Uint8Array(c.room);
        const into = new TextEncoder().encodeInto(c.input, out);
        return {base64, utf8: Array.from(new TextEncoder().encode(c.input)), into, intoBytes: Array.from(out)};
      })};
    """, with_cases=True)
    assert _mismatches(CASES["text"], got) == []


def test_latin1_is_windows_1252_as_the_encoding_standard_says(tmp_path):
    """Node decodes "latin1" as ISO-8859-1; browsers and the standard map 0x80-0x9F to windows-1252's characters."""
    body = _run(tmp_path, """
      const d = new TextDecoder("latin1");
      return {status: 200, body: {encoding: d.encoding, text: d.decode(new Uint8Array([0x80, 0x81, 0x9f, 0xa0, 0xe9, 0xff]))}};
    """)
    assert body == {"encoding": "windows-1252", "text": "\u20ac\u0081\u0178\u00a0\u00e9\u00ff"}


def test_an_encoding_it_does_not_know_is_a_range_error_naming_it(tmp_path):
    body = _run(tmp_path, """
      try { new TextDecoder("shift_jis"); } catch (e) { return {status: 200, body: {name: e.name, message: e.message}}; }
    """)
    assert body["name"] == "RangeError" and "'shift_jis' is not supported" in body["message"]


def test_a_binary_request_body_decodes_and_a_basic_authorization_header_is_built_for_fetch(tmp_path, stub: Stub):
    """The README sends fetch credentials in an authorization header, not in the URL: Basic needs btoa."""
    body = _run(tmp_path, f"""
      const text = new TextDecoder().decode(req.body);
      await ctx.fetch("{stub.url}/api/charge", {{headers: {{authorization: "Basic " + btoa("user:" + text)}}}});
      return {{status: 200, body: {{text}}}};
    """, body="pässwörd".encode())
    [request] = stub.requests
    assert body == {"text": "pässwörd"}
    # btoa takes latin-1: a UTF-8 secret goes through TextEncoder first, and this one did not
    # need to (its characters are latin-1), so the header carries its latin-1 bytes.
    assert request["headers"]["authorization"] == "Basic " + base64.b64encode("user:pässwörd".encode("latin-1")).decode()


def test_structured_clone_keeps_types_cycles_and_shared_buffers(tmp_path):
    body = _run(tmp_path, """
      const bytes = new Uint8Array([1, 2, 3, 4]);
      const original = {when: new Date(86400000), seen: new Set(["a"]), by: new Map([[1, {n: 1n}]]), re: /x+/gi,
                        list: [1, , 3], head: new Uint8Array(bytes.buffer, 1, 2), view: new DataView(bytes.buffer),
                        wrapped: new String("s"), error: new RangeError("bad", {cause: "why"})};
      original.self = original;
      const c = structuredClone(original);
      return {status: 200, body: {
        distinct: c !== original && c.when !== original.when && c.head.buffer !== bytes.buffer,
        self: c.self === c, when: c.when.toISOString(), seen: [...c.seen], n: typeof c.by.get(1).n,
        re: [c.re.source, c.re.flags], hole: !(1 in c.list), length: c.list.length,
        shared: c.head.buffer === c.view.buffer, head: [...c.head], wrapped: c.wrapped instanceof String,
        error: [c.error instanceof RangeError, c.error.message, c.error.cause],
      }};
    """)
    assert body == {"distinct": True, "self": True, "when": "1970-01-02T00:00:00.000Z", "seen": ["a"], "n": "bigint",
                    "re": ["x+", "gi"], "hole": True, "length": 3, "shared": True, "head": [2, 3], "wrapped": True,
                    "error": [True, "bad", "why"]}


def test_structured_clone_keeps_an_own_proto_key_as_a_property(tmp_path):
    body = _run(tmp_path, """
      const c = structuredClone(JSON.parse('{"__proto__": {"polluted": true}, "a": 1}'));
      return {status: 200, body: {proto: Object.getPrototypeOf(c) === Object.prototype, own: Object.keys(c), polluted: c.polluted ?? null}};
    """)
    assert body == {"proto": True, "own": ["__proto__", "a"], "polluted": None}


@pytest.mark.parametrize(("value", "said"), [
    ("() => 1", "() => 1 could not be cloned."),
    ("{s: Symbol('x')}", "Symbol(x) could not be cloned."),
    ("new WeakMap()", "#<WeakMap> could not be cloned."),
    ("Promise.resolve(1)", "#<Promise> could not be cloned."),
])
def test_structured_clone_refuses_what_it_cannot_clone_with_a_data_clone_error(tmp_path, value, said):
    body = _run(tmp_path, f"""
      try {{ structuredClone({value}); }}
      catch (e) {{ return {{status: 200, body: [e instanceof DOMException, e.name, e.code, e.message]}}; }}
    """)
    assert body == [True, "DataCloneError", 25, said]


def test_structured_clone_transfer_detaches_the_original_buffer(tmp_path):
    body = _run(tmp_path, """
      const buffer = new Uint8Array([7, 8]).buffer;
      const copy = structuredClone({buffer}, {transfer: [buffer]});
      let twice;
      try { structuredClone(buffer, {transfer: [buffer]}); } catch (e) { twice = e.name; }
      return {status: 200, body: {original: [buffer.detached, buffer.byteLength], copy: [...new Uint8Array(copy.buffer)], twice}};
    """)
    assert body == {"original": [True, 0], "copy": [7, 8], "twice": "DataCloneError"}


def test_dom_exception_is_an_error_whose_name_message_and_code_are_its_prototypes(tmp_path):
    body = _run(tmp_path, """
      const e = new DOMException("gone", "AbortError");
      return {status: 200, body: {
        error: e instanceof Error, text: String(e), code: e.code, constant: DOMException.ABORT_ERR,
        own: Object.getOwnPropertyNames(e), tag: Object.prototype.toString.call(e), plain: new DOMException().name,
        stack: e.stack.split("\\n")[0],
      }};
    """)
    assert body == {"error": True, "text": "AbortError: gone", "code": 20, "constant": 20, "own": ["stack"],
                    "tag": "[object DOMException]", "plain": "Error", "stack": "AbortError: gone"}


def test_queue_microtask_runs_before_a_timer_and_its_error_is_logged_on_the_function_span(tmp_path):
    write_project(tmp_path, {"w": """
        export default async function () {
          const order = [];
          setTimeout(() => order.push("timer"), 0);
          queueMicrotask(() => order.push("microtask"));
          queueMicrotask(() => { throw new Error("from a microtask"); });
          order.push("sync");
          await new Promise((resolve) => setTimeout(resolve, 5));
          return {status: 200, body: order};
        }
    """})
    result = run1(tmp_path, "w")
    assert (result.status, result.body) == (200, ["sync", "microtask", "timer"])
    [function_span] = [s for s in result.spans if s["name"] == "w"]
    [event] = [e for e in function_span["events"] if e["name"] == "log"]
    assert event["attributes"]["level"] == "error"
    assert event["attributes"]["message"].startswith("Uncaught (in queueMicrotask) Error: from a microtask")


def test_the_globals_serve_top_level_code_are_not_enumerable_and_can_be_replaced(tmp_path):
    """Compiled on first use with the eval taken before the function ran (lazy.js)."""
    write_project(tmp_path, {"w": """
        globalThis.eval = () => { throw new Error("no eval here"); };
        const ENCODED = new TextEncoder().encode("é");
        export default async function () {
          globalThis.btoa = () => "mine";
          return {status: 200, body: {encoded: [...ENCODED], btoa: btoa("x"), atob: atob("eA=="),
                                      listed: Object.keys(globalThis).filter((k) => /Text|clone|Microtask|DOM|atob/.test(k))}};
        }
    """})
    result = run1(tmp_path, "w")
    assert (result.status, result.body) == (200, {"encoded": [0xC3, 0xA9], "btoa": "mine", "atob": "x", "listed": []})


def test_the_web_apis_are_there_in_the_isolates_own_context_too(tmp_path, monkeypatch):
    """Without realms the prelude's files are evaluated as one script in the isolate's own context."""
    from flux.runtime import isolate

    monkeypatch.setattr(isolate, "HOOK", None)
    body = _run(tmp_path, 'return {status: 200, body: {v: new TextDecoder().decode(new TextEncoder().encode(atob("w6k=")))}};')
    assert body == {"v": "\u00c3\u00a9"}
