"""V8's ShadowRealm hook: fresh contexts in one isolate, set through mini-racer's library."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from py_mini_racer._mini_racer import _make_context

from flux.runtime.isolate import _eval_unshared
from flux.runtime.realm import HOOK, on_isolate_thread


def test_the_hook_is_found_in_the_pinned_mini_racer():
    """Without it every request would pay for a whole isolate: say so here, not in a benchmark."""
    assert HOOK is not None


def test_a_realm_has_its_own_globals_and_builtins():
    maker = _make_context()
    context = maker.__enter__()
    try:
        HOOK.install(context)
        seen = _eval_unshared(context, """
            globalThis.outer = 1;
            Array.prototype.mark = "outer";
            const first = new ShadowRealm();
            first.evaluate("globalThis.inner = 2; Array.prototype.mark = 'first'");
            const second = new ShadowRealm();
            JSON.stringify([first.evaluate("typeof outer + ' ' + inner + ' ' + [].mark"),
                            second.evaluate("typeof outer + ' ' + typeof inner + ' ' + [].mark"),
                            [].mark]);
        """)
    finally:
        maker.__exit__(None, None, None)
    assert seen == '["undefined 2 first","undefined undefined undefined","outer"]'


def test_realms_can_be_switched_off():
    out = subprocess.run([sys.executable, "-c", "from flux.runtime.realm import HOOK; print(HOOK)"],
                         env={**os.environ, "FLUX_REALMS": "off"}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_work_runs_on_the_isolates_own_thread_and_its_errors_reach_the_caller():
    maker = _make_context()
    context = maker.__enter__()
    try:
        assert on_isolate_thread(context, threading.get_native_id) != threading.get_native_id()
        with pytest.raises(ZeroDivisionError):
            on_isolate_thread(context, lambda: 1 / 0)
        assert _eval_unshared(context, "6 * 7") == 42  # the context's results queue is still in order
    finally:
        maker.__exit__(None, None, None)
