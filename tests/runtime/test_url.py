"""`URL` and `URLSearchParams` (flux/runtime/url.js) as a function sees them, in real V8.

The tables in tests/data/url/cases.json hold what Node.js's own (WHATWG) URL answers for each
input; tests/data/url/generate.js regenerates them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.functions import Stub, write_project
from tests.runtime.test_executor import run1

CASES_TEXT = (Path(__file__).parent.parent / "data" / "url" / "cases.json").read_text()
CASES = json.loads(CASES_TEXT)

# The cases go into the function's source as a JS literal, not through the request body: some
# inputs hold a lone surrogate, which JSON text can carry escaped but a request body cannot.
PARTS_JS = """
const PARTS = ["href", "origin", "protocol", "username", "password", "host", "hostname", "port", "pathname", "search", "hash"];
const parts = (url) => ({...Object.fromEntries(PARTS.map((k) => [k, url[k]])), searchParams: [...url.searchParams]});
"""


def _run(tmp_path: Path, body_js: str, *, with_cases: bool = False, toml: str = "") -> Any:
    """The body a function returns whose handler body is `body_js` (CASES in scope if asked)."""
    source = (f"const CASES = {CASES_TEXT};\n" if with_cases else "") + PARTS_JS + (
        f"export default async function (req, ctx) {{\n{body_js}\n}}\n")
    write_project(tmp_path, {"u": source}, toml)
    result = run1(tmp_path, "u")
    assert result.status == 200, result.error
    return result.body


def _mismatches(cases: list[dict], got: list[Any], key: str = "expected") -> list[dict]:
    return [{**case, "got": actual} for case, actual in zip(cases, got, strict=True) if actual != case[key]]


def test_parsing_matches_node_for_every_input_and_base(tmp_path):
    got = _run(tmp_path, """
      return {status: 200, body: CASES.parse.map((c) => {
        try { return parts(c.base === undefined ? new URL(c.input) : new URL(c.input, c.base)); }
        catch (e) { return e instanceof TypeError && e.message.startsWith("Invalid URL: ") ? null : String(e); }
      })};
    """, with_cases=True)
    assert _mismatches(CASES["parse"], got) == []


def test_every_setter_matches_node(tmp_path):
    got = _run(tmp_path, """
      return {status: 200, body: CASES.setters.map((c) => {
        const url = new URL(c.href);
        let threw = false;
        try { url[c.setter] = c.value; } catch (e) { threw = e instanceof TypeError; }
        return {threw, expected: parts(url), params: [...url.searchParams]};
      })};
    """, with_cases=True)
    wanted = [{"threw": c["threw"], "expected": c["expected"], "params": c["params"]} for c in CASES["setters"]]
    assert [case for case, actual, want in zip(CASES["setters"], got, wanted) if actual != want] == []


def test_url_search_params_match_node_from_each_kind_of_init(tmp_path):
    got = _run(tmp_path, """
      return {status: 200, body: CASES.params.map((c) => {
        const p = new URLSearchParams(typeof c.init === "string" ? c.init : c.init.pairs ?? c.init.record);
        for (const [op, ...args] of c.ops) p[op](...args);
        return {string: p.toString(), entries: [...p], size: p.size, get: p.get("a"), getAll: p.getAll("a"),
                has: p.has("a"), hasValue: p.has("a", "1")};
      })};
    """, with_cases=True)
    assert _mismatches(CASES["params"], got) == []


def test_url_search_params_round_trip_through_their_string(tmp_path):
    body = _run(tmp_path, """
      const p = new URLSearchParams({q: "a b&c=d", "ü": "100%", empty: ""});
      p.append("q", "+/?#");
      const again = new URLSearchParams(p.toString());
      const copy = new URLSearchParams(p);
      return {status: 200, body: {text: p.toString(), same: [...again].join("|") === [...p].join("|"),
                                  copy: copy.toString(), independent: (copy.append("x", "1"), p.has("x"))}};
    """)
    assert body == {"text": "q=a+b%26c%3Dd&%C3%BC=100%25&empty=&q=%2B%2F%3F%23", "same": True,
                    "copy": "q=a+b%26c%3Dd&%C3%BC=100%25&empty=&q=%2B%2F%3F%23", "independent": False}


def test_search_params_and_search_stay_linked_both_ways(tmp_path):
    body = _run(tmp_path, """
      const url = new URL("https://api.example.com/items?page=1#top");
      const params = url.searchParams;
      params.set("page", "2");
      params.append("tag", "a b");
      const afterParams = url.href;
      url.search = "?q=x";
      const afterSearch = [...params];
      params.delete("q");
      const emptied = url.href;
      url.href = "https://other.example/?k=v";
      return {status: 200, body: {afterParams, afterSearch, emptied, same: url.searchParams === params, last: params.get("k")}};
    """)
    assert body == {"afterParams": "https://api.example.com/items?page=2&tag=a+b#top", "afterSearch": [["q", "x"]],
                    "emptied": "https://api.example.com/items#top", "same": True, "last": "v"}


def test_iteration_is_live_and_each_iterator_reads_as_the_standard_one(tmp_path):
    body = _run(tmp_path, """
      const p = new URLSearchParams("a=1&b=2");
      const seen = [];
      p.forEach((value, name, self) => { seen.push(name + value); if (name === "a") self.append("c", "3"); });
      const it = p.keys();
      it.next();
      p.delete("a");
      return {status: 200, body: {seen, rest: [...it], values: [...p.values()], entries: [...p.entries()],
                                  tag: Object.prototype.toString.call(p.entries()),
                                  iterable: typeof p[Symbol.iterator] === "function" && p[Symbol.iterator] === p.entries}};
    """)
    assert body == {"seen": ["a1", "b2", "c3"], "rest": ["c"], "values": ["2", "3"], "entries": [["b", "2"], ["c", "3"]],
                    "tag": "[object URLSearchParams Iterator]", "iterable": True}


def test_url_and_url_search_params_behave_as_built_ins_and_hide_their_state(tmp_path):
    body = _run(tmp_path, """
      const url = new URL("https://example.com/a?b=1");
      let brand = null;
      try { Object.getOwnPropertyDescriptor(URL.prototype, "href").get.call({}); } catch (e) { brand = e.constructor.name; }
      return {status: 200, body: {
        string: String(url), template: `${url}`, json: JSON.stringify({url}),
        instance: url instanceof URL && url.searchParams instanceof URLSearchParams,
        tags: [Object.prototype.toString.call(url), Object.prototype.toString.call(url.searchParams)],
        own: [...Object.getOwnPropertyNames(url), ...Object.getOwnPropertySymbols(url),
              ...Object.getOwnPropertyNames(url.searchParams)],
        enumerableGlobals: Object.keys(globalThis).filter((k) => k.startsWith("URL")),
        lengths: [URL.length, URLSearchParams.length], brand,
        enumerable: [Object.keys(URL).sort(), Object.keys(URL.prototype).sort(), Object.keys(URLSearchParams.prototype).sort()],
      }};
    """)
    assert body == {"string": "https://example.com/a?b=1", "template": "https://example.com/a?b=1",
                    "json": '{"url":"https://example.com/a?b=1"}', "instance": True,
                    "tags": ["[object URL]", "[object URLSearchParams]"], "own": [], "enumerableGlobals": [],
                    "lengths": [1, 0], "brand": "TypeError",
                    "enumerable": [["canParse", "parse"],
                                   sorted(["href", "origin", "protocol", "username", "password", "host", "hostname", "port", "pathname",
                                           "search", "searchParams", "hash", "toJSON", "toString"]),
                                   sorted(["size", "append", "delete", "get", "getAll", "has", "set", "sort", "entries", "forEach", "keys",
                                           "values", "toString"])]}


@pytest.mark.parametrize(("call", "expected"), [
    ('URL.parse("nope")', None),
    ('URL.parse("/x", "https://a.example/y").href', "https://a.example/x"),
    ('URL.canParse("https://a.example")', True),
    ('URL.canParse("x", "mailto:y")', False),
])
def test_url_parse_answers_null_and_can_parse_a_boolean_instead_of_throwing(tmp_path, call, expected):
    assert _run(tmp_path, f"return {{status: 200, body: {{v: {call}}}}};") == {"v": expected}


def test_an_invalid_url_is_a_type_error_that_names_the_input(tmp_path):
    body = _run(tmp_path, """
      try { new URL("https://exa mple.com/"); } catch (e) { return {status: 200, body: {name: e.name, message: e.message}}; }
    """)
    assert body == {"name": "TypeError", "message": "Invalid URL: https://exa mple.com/"}


def test_a_function_builds_its_fetch_url_and_form_body_with_url_and_search_params(tmp_path, stub: Stub):
    body = _run(tmp_path, f"""
      const url = new URL("v1/charges", "{stub.url}/api/");
      url.searchParams.set("expand", "customer card");
      url.searchParams.append("limit", "10");
      const form = new URLSearchParams({{amount: "1000", description: "Café & co"}});
      const res = await ctx.fetch(url, {{method: "POST", body: form.toString(),
                                        headers: {{"content-type": "application/x-www-form-urlencoded"}}}});
      return {{status: 200, body: await res.json()}};
    """)
    [request] = stub.requests
    assert body == {"id": "cus_123", "path": "/api/v1/charges"}
    assert (request["path"], request["query"], request["body"]) == (
        "/api/v1/charges", "expand=customer+card&limit=10", "amount=1000&description=Caf%C3%A9+%26+co")


def test_a_function_in_the_isolates_own_context_has_url_too(tmp_path, monkeypatch):
    """Without realms the prelude's files are evaluated as one script in the isolate's own context."""
    from flux.runtime import isolate

    monkeypatch.setattr(isolate, "HOOK", None)
    body = _run(tmp_path, 'return {status: 200, body: {v: new URL("?q=1", "https://a.example/p").searchParams.get("q")}};')
    assert body == {"v": "1"}


def test_url_is_there_for_top_level_code_and_when_the_function_replaced_eval(tmp_path):
    """The implementation is compiled on first use (lazy.js) with the eval taken before the function ran."""
    write_project(tmp_path, {"u": """
        globalThis.eval = () => { throw new Error("no eval here"); };
        const BASE = new URL("https://api.example.com/v2/");
        export default async function () {
          return {status: 200, body: {v: new URL("items?id=7", BASE).href, p: new URLSearchParams("a=1").get("a")}};
        }
    """})
    result = run1(tmp_path, "u")
    assert (result.status, result.body) == (200, {"v": "https://api.example.com/v2/items?id=7", "p": "1"})


def test_a_function_may_replace_the_url_global_with_its_own(tmp_path):
    body = _run(tmp_path, 'globalThis.URL = function Mine() {}; return {status: 200, body: {v: URL.name}};')
    assert body == {"v": "Mine"}


# Node 20 answers otherwise (in brackets), so these are not in its table.
@pytest.mark.parametrize(("expression", "expected"), [
    # The path state: "for input /usr/.. the result is / and not a lack of a path" (sc://h, data:).
    ('new URL("sc://h/a/../..").href', "sc://h/"),
    ('new URL("data:/..").href', "data:/"),
    # The port state with a state override: no digit before the first other code point is a failure (cleared).
    ('Object.assign(new URL("https://h:8/"), {port: ".1"}).port', "8"),
    # UTF-8 encode, then percent-decode, then UTF-8 decode: é is two bytes (two U+FFFD).
    ('new URLSearchParams("%C3%A9=\u00e9%ff").get("\u00e9")', "\u00e9\ufffd"),
], ids=["double-dot", "double-dot-opaque-scheme", "port-setter", "form-decoding"])
def test_where_node_20_departs_from_the_standard_the_standard_holds(tmp_path, expression, expected):
    assert _run(tmp_path, f"return {{status: 200, body: {{v: {expression}}}}};") == {"v": expected}


def test_a_search_params_fetch_body_is_sent_as_a_form(tmp_path, stub: Stub):
    """As fetch sends one: its text, typed application/x-www-form-urlencoded unless the call says otherwise."""
    _run(tmp_path, f"""
      await ctx.fetch("{stub.url}/form", {{method: "POST", body: new URLSearchParams({{q: "a b", n: "é"}})}});
      await ctx.fetch("{stub.url}/typed", {{method: "POST", body: new URLSearchParams("x=1"), headers: {{"content-type": "text/plain"}}}});
      return {{status: 200, body: {{}}}};
    """)
    form, typed = ({**r, "type": {k.lower(): v for k, v in r["headers"].items()}["content-type"]} for r in stub.requests)
    assert (form["body"], form["type"]) == ("q=a+b&n=%C3%A9", "application/x-www-form-urlencoded;charset=UTF-8")
    assert (typed["body"], typed["type"]) == ("x=1", "text/plain")
