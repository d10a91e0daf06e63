"""Where steps, and the calls and logs made through the root ctx, nest (prelude.js, currentParent):
under the innermost step whose callback they are made in, as V8's async stack frames show it; by
the chain rule where the stack shows neither a step nor the handler. Real V8, through the
executor (`run1`)."""

from __future__ import annotations

from pathlib import Path

from tests.functions import Stub, write_project
from tests.runtime.test_executor import Execution, run1

# Steps a and b, started together through the root ctx: a's callback awaits `then()` once it
# resumes, which it does while b's is still open; b's logs "in b".
TOGETHER = """
    let release;
    const gate = new Promise((resolve) => { release = resolve; });
    const together = (then) => Promise.all([
      ctx.step("a", async () => { await gate; await then(); }),
      ctx.step("b", async () => { release(); await null; ctx.log("in b"); }),
    ]);
"""


def parents(result: Execution) -> dict[str, str]:
    """The name of each span's and each log's parent: a span by its name, a log by its message;
    the function span is "function"."""
    function = result.spans[0]
    names = {s["id"]: s["name"] for s in result.spans} | {function["id"]: "function"}
    nested = {s["name"]: names[s["parent"]] for s in result.spans[1:]}
    for span in result.spans:
        for event in span["events"]:
            if event["name"] == "log":
                nested[event["attributes"]["message"]] = names[span["id"]]
    return nested


def run_together(tmp_path: Path, in_a: str, *, setup: str = "", body: str = "null") -> Execution:
    """A function that runs `setup`, then steps a and b (TOGETHER) with `in_a` (an expression) in
    a, and answers `body`."""
    write_project(tmp_path, {"together": f"""
        export default async function (req, ctx) {{
          {setup}
          {TOGETHER}
          await together(() => {in_a});
          return {{status: 200, body: {body}}};
        }}
    """})
    return run1(tmp_path, "together")


def test_steps_started_together_through_the_root_ctx_are_siblings(tmp_path):
    result = run_together(tmp_path, 'ctx.log("in a")')
    assert parents(result) == {"a": "function", "b": "function", "in a": "a", "in b": "b"}


def test_a_root_ctx_call_the_handler_makes_while_a_step_runs_nests_under_the_function(tmp_path):
    write_project(tmp_path, {"meanwhile": """
        export default async function (req, ctx) {
          let release;
          const gate = new Promise((resolve) => { release = resolve; });
          const background = ctx.step("background", () => gate);
          ctx.log("meanwhile");
          await null;
          ctx.log("meanwhile, after an await");
          await ctx.step("next", async () => {});
          release();
          await background;
          return {status: 200};
        }
    """})
    assert parents(run1(tmp_path, "meanwhile")) == {"background": "function", "next": "function", "meanwhile": "function",
                                                    "meanwhile, after an await": "function"}


def test_steps_nested_through_the_root_ctx_nest_under_each_other(tmp_path):
    write_project(tmp_path, {"nested": """
        export default async function (req, ctx) {
          await ctx.step("outer", async () => {
            ctx.log("in outer");
            await ctx.step("inner", async () => { await null; ctx.log("in inner"); });
            ctx.log("in outer again");
          });
          return {status: 200};
        }
    """})
    assert parents(run1(tmp_path, "nested")) == {"outer": "function", "inner": "outer", "in outer": "outer", "in inner": "inner",
                                                 "in outer again": "outer"}


def test_steps_started_together_inside_a_step_nest_under_it(tmp_path):
    write_project(tmp_path, {"inside": f"""
        export default async function (req, ctx) {{
          await ctx.step("outer", async () => {{
            {TOGETHER}
            await together(() => ctx.log("in a"));
          }});
          return {{status: 200}};
        }}
    """})
    assert parents(run1(tmp_path, "inside")) == {"outer": "function", "a": "outer", "b": "outer", "in a": "a", "in b": "b"}


def test_calls_through_the_root_ctx_nest_under_the_step_they_are_made_in(tmp_path, stub: Stub):
    write_project(tmp_path, {"calls": f"""
        export default async function (req, ctx) {{
          let release;
          const gate = new Promise((resolve) => {{ release = resolve; }});
          await Promise.all([
            ctx.step("a", async () => {{
              await ctx.fetch("{stub.url}/ok", {{name: "a1"}});
              const second = ctx.fetch("{stub.url}/ok", {{name: "a2"}});  // b is open
              release();
              await second;
            }}),
            ctx.step("b", async () => {{ await ctx.fetch("{stub.url}/ok", {{name: "b1"}}); await gate; }}),
          ]);
          return {{status: 200}};
        }}
    """})
    assert parents(run1(tmp_path, "calls")) == {"a": "function", "b": "function", "a1": "a", "a2": "a", "b1": "b"}


def test_a_call_in_a_then_callback_the_step_awaits_nests_under_the_step(tmp_path):
    result = run_together(tmp_path, 'Promise.resolve().then(() => ctx.log("in a\'s then"))')
    assert parents(result)["in a's then"] == "a"


def test_console_logs_nest_as_root_ctx_logs_do(tmp_path):
    assert parents(run_together(tmp_path, 'console.log("console in a")'))["console in a"] == "a"


def test_a_step_that_throws_leaves_the_steps_beside_it_nesting_right(tmp_path):
    write_project(tmp_path, {"throws": """
        export default async function (req, ctx) {
          const failing = ctx.step("fails", async () => { await null; throw new Error("no"); });
          await ctx.step("b", async () => { await failing.catch(() => {}); ctx.log("in b, after fails"); });
          return {status: 200};
        }
    """})
    result = run1(tmp_path, "throws")
    assert parents(result) == {"fails": "function", "b": "function", "in b, after fails": "b"}
    assert next(s for s in result.spans if s["name"] == "fails")["status"] == "error"


def test_a_deep_stack_does_not_hide_the_step(tmp_path):
    result = run_together(tmp_path, 'deep(200, () => ctx.log("200 frames deep in a"))',
                          setup="const deep = (n, call) => n === 0 ? call() : deep(n - 1, call);")
    assert parents(result)["200 frames deep in a"] == "a"


def test_the_functions_own_error_settings_neither_break_nor_steer_nesting(tmp_path):
    result = run_together(tmp_path, 'ctx.log("in a")', body="[Error.stackTraceLimit, Error.prepareStackTrace()]", setup="""
        Error.stackTraceLimit = 1;
        Error.captureStackTrace = () => { throw new Error("not yours"); };
        const mine = () => "mine";
        Object.defineProperty(Error, "prepareStackTrace", {get: () => mine, set: () => { throw new Error("not yours"); },
                                                           configurable: true});
    """)
    assert (result.status, result.body) == (200, [1, "mine"])
    assert parents(result) == {"a": "function", "b": "function", "in a": "a", "in b": "b"}


def test_the_stack_frames_methods_cannot_be_replaced_by_the_function(tmp_path):
    """The prelude reads frames with V8's own methods, which V8 makes non-writable and non-configurable."""
    result = run_together(tmp_path, 'ctx.log("in a")', body="refused", setup="""
        Error.prepareStackTrace = (_, frames) => frames;
        const frame = Object.getPrototypeOf(new Error().stack[0]);
        Error.prepareStackTrace = undefined;
        const refused = [];
        for (const method of ["getFunctionName", "getScriptNameOrSourceURL"]) {
          try { Object.defineProperty(frame, method, {value: () => "mine"}); } catch (e) { refused.push(e.name); }
        }
    """)
    assert result.body == ["TypeError", "TypeError"]
    assert parents(result) == {"a": "function", "b": "function", "in a": "a", "in b": "b"}


def test_with_error_frozen_calls_nest_by_the_chain_rule(tmp_path):
    """The stack cannot be read: under the open step while the open steps form a chain (each
    started while the one before was open), else under the function span; so b, started while a
    was open, nests under a, as before the stack was read."""
    result = run_together(tmp_path, 'ctx.log("in a")', setup="Object.freeze(Error);")
    assert parents(result) == {"a": "function", "b": "a", "in a": "b", "in b": "b"}


def test_a_timer_callback_nests_by_the_chain_rule(tmp_path):
    """V8 keeps no async frames across a timer: the stack shows neither a step nor the handler."""
    write_project(tmp_path, {"timers": """
        export default async function (req, ctx) {
          await ctx.step("alone", () => new Promise((resolve) => setTimeout(() => { ctx.log("timer in alone"); resolve(); }, 0)));
          let release;
          const gate = new Promise((resolve) => { release = resolve; });
          await Promise.all([
            ctx.step("a", () => new Promise((resolve) => setTimeout(() => { ctx.log("timer in a, beside b"); release(); resolve(); }, 0))),
            ctx.step("b", () => gate),
          ]);
          return {status: 200};
        }
    """})
    nested = parents(run1(tmp_path, "timers"))
    assert (nested["timer in alone"], nested["timer in a, beside b"]) == ("alone", "function")


def test_a_function_named_like_the_frames_of_another_request_does_not_steer_nesting(tmp_path):
    """The prelude's markers are nonces of each request's context: names read off one request's
    stack mean nothing in the next."""
    write_project(tmp_path, {"named": """
        function names() {
          Error.prepareStackTrace = (_, frames) => frames;
          Error.stackTraceLimit = Infinity;
          const frames = new Error().stack;
          Error.prepareStackTrace = undefined;
          return frames.map((frame) => frame.getFunctionName()).filter(Boolean);
        }
        export default async function (req, ctx) {
          if (req.body === null) return {status: 200, body: await ctx.step("s", async () => { await null; return names(); })};
          await ctx.step("s", async () => {
            for (const name of req.body) ({[name]: () => ctx.log(`from ${name}`)})[name]();
          });
          return {status: 200};
        }
    """})
    names = run1(tmp_path, "named").body
    assert len(names) >= 3  # names() itself, the step's callback and the frames of the prelude's below it
    assert parents(run1(tmp_path, "named", names)) == {"s": "function"} | {f"from {name}": "s" for name in names}


def test_a_step_whose_name_cannot_be_read_rejects_rather_than_throws(tmp_path):
    """ctx.step always answers with a promise, as an async function does."""
    write_project(tmp_path, {"badname": """
        export default async function (req, ctx) {
          const step = ctx.step({toString() { throw new Error("no name"); }}, async () => {});
          return {status: 200, body: await step.catch((e) => e.message)};
        }
    """})
    result = run1(tmp_path, "badname")
    assert (result.status, result.body, len(result.spans)) == (200, "no name", 1)


def test_a_root_ctx_call_in_a_step_is_located_within_the_functions_own_stack_trace_limit(tmp_path, stub: Stub):
    """The stack read for the step is read once, past the function's Error.stackTraceLimit: the
    call's location comes from the frames within the limit, as V8 would have captured them (the
    prelude's ctx.fetch is the first frame, the function's helper the second)."""
    write_project(tmp_path, {"limits": f"""
        const go = (ctx, name) => ctx.fetch("{stub.url}/ok", {{name}});
        export default async function (req, ctx) {{
          await ctx.step("s", async () => {{
            await go(ctx, "default");
            Error.stackTraceLimit = 1;
            await go(ctx, "one frame");
            Error.stackTraceLimit = 2.5;
            await go(ctx, "two frames");
            Object.defineProperty(Error, "stackTraceLimit", {{get: () => 10, configurable: true}});
            await go(ctx, "a getter");
          }});
          return {{status: 200}};
        }}
    """})
    result = run1(tmp_path, "limits")
    located = {s["name"]: s["attributes"].get("code.location") for s in result.spans[1:] if s["name"] != "s"}
    assert located == {"default": "functions/limits.js:1:31", "one frame": None, "two frames": "functions/limits.js:1:31",
                       "a getter": None}
    assert parents(result) == {"s": "function", "default": "s", "one frame": "s", "two frames": "s", "a getter": "s"}
