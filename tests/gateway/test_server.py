"""Serving: reload on file change, and the gateway's own pieces wired by `build()`."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import socket
import subprocess
import time
import weakref
from contextlib import asynccontextmanager

import psycopg
import pytest

from flux.gateway import server
from flux.gateway.server import _watch, freeze_heap
from flux.gateway.traces import TraceWriter
from flux.project import load_project
from flux.store.schema import ensure_schema
from tests.functions import running_gateway, write_project


def test_changed_function_files_are_reloaded_and_requests_use_the_new_code(tmp_path):
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            first = await (await client.post("/v")).get_data(as_text=True)
            time.sleep(0.01)  # a distinct mtime
            (tmp_path / "functions" / "v.js").write_text("export default async function () { return {status: 200, body: 'two'}; }\n")
            (tmp_path / "functions" / "w.js").write_text("export default async function () { return {status: 200, body: 'new'}; }\n")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if "w" in gateway.functions.compiled:
                    break
            second = await (await client.post("/v")).get_data(as_text=True)
            added = await (await client.post("/w")).get_data(as_text=True)
            return first, second, added

    assert asyncio.run(scenario()) == ("one", "two", "new")


@asynccontextmanager
async def _watched(directory, **watch):
    """A gateway serving `directory` whose watcher looks for changes every 50 ms: (gateway, client, watcher)."""
    async with running_gateway(directory, None) as (gateway, client):
        shutdown = asyncio.Event()
        watcher = asyncio.create_task(_watch(gateway, shutdown, interval=0.05, **watch))
        try:
            yield gateway, client, watcher
        finally:
            shutdown.set()
            watcher.cancel()


def test_a_commit_reloads_the_project_so_traces_name_the_commit_that_holds_the_code(tmp_path):
    """A function edited (and reloaded) then committed, with no file changed by the commit: traces
    named the commit before, whose code is not what runs."""
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@x", "-c", "user.name=t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            git("commit", "-q", "--allow-empty", "-m", "two")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if gateway.functions.project.git_commit == git("rev-parse", "HEAD"):
                    break
            return gateway.functions.project.git_commit

    assert asyncio.run(scenario()) == git("rev-parse", "HEAD")


def test_a_flux_toml_of_the_wrong_shape_is_not_reloaded_and_later_fixes_still_are(tmp_path, caplog):
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})
    caplog.set_level(logging.INFO)

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            (tmp_path / "flux.toml").write_text('[routes]\n"POST /x" = ["v"]\n')
            await _wait_for(lambda: "not reloaded" in caplog.text, 5)
            (tmp_path / "flux.toml").write_text('[routes]\n"POST /x" = "v"\n')
            await _wait_for(lambda: gateway.project.route("POST", "/x"), 5)
            answer = await (await client.post("/x")).get_data(as_text=True)
            return answer

    assert asyncio.run(scenario()) == "one"
    assert 'Route "POST /x"' in caplog.text


def test_health_says_while_an_invalid_flux_toml_keeps_the_previous_version_serving(tmp_path):
    """The log said `not reloaded`; /_flux/health showed no error, as if the files on disk were what served
    (a function added meanwhile answered 404 with nothing saying why)."""
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            (tmp_path / "flux.toml").write_text("[project\n")
            await _wait_for(lambda: gateway.reload_error, 5)
            broken = (await (await client.get("/_flux/health")).get_json())["reload_error"]
            served = await (await client.post("/v")).get_data(as_text=True)
            (tmp_path / "flux.toml").write_text('[project]\nname = "fixed"\n')
            await _wait_for(lambda: gateway.project.name == "fixed", 5)
            return broken, served, (await (await client.get("/_flux/health")).get_json())["reload_error"]

    broken, served, fixed = asyncio.run(scenario())
    assert broken.startswith("not reloaded: ") and "flux.toml is not valid TOML" in broken
    assert "still serving the version of" in broken
    assert served == "one" and fixed is None


def test_functions_pooled_connections_find_a_dead_peer_within_a_minute(tmp_path, dsn):
    """They live for days; behind a silent partition a statement on one waited to the function's time limit
    (a 504 per pooled connection), and TCP itself took about 15 minutes to give up."""
    write_project(tmp_path, {"v": "export default async function () { return {status: 200}; }"})

    async def options() -> dict[bytes, bytes | None]:
        gateway, stop = await server.build(server.ServeConfig(root=tmp_path, dsn=dsn, record=False), load_project(tmp_path))
        try:
            async with gateway.db_pool.connection() as conn:
                return {option.keyword: option.val for option in conn.pgconn.info}
        finally:
            await stop()
            gateway.functions.close()

    found = asyncio.run(options())
    assert (found[b"keepalives_idle"], found[b"keepalives_count"], found[b"tcp_user_timeout"]) == (b"30", b"3", b"60000")


def test_a_reload_that_breaks_a_function_keeps_serving_the_others(tmp_path):
    write_project(tmp_path, {"a": "export default async function () { return {status: 200, body: 'a'}; }",
                             "b": "export default async function () { return {status: 200, body: 'b'}; }"})

    async def scenario():
        async with running_gateway(tmp_path, None) as (gateway, client):
            (tmp_path / "functions" / "a.js").write_text("export default async function () {\n  return {;\n}\n")
            errors = await gateway.reload(gateway.project.reload())
            return errors, (await client.post("/a")).status_code, await (await client.post("/b")).get_data(as_text=True)

    errors, broken, ok = asyncio.run(scenario())
    assert errors and errors[0].startswith("functions/a.js:2: SyntaxError")
    assert broken == 500 and ok == "b"


def test_a_reload_applies_a_changed_body_limit(tmp_path):
    echo = "export default async function (req) { return {status: 200, body: req.body.length}; }"
    write_project(tmp_path, {"echo": echo}, "[limits]\nmax_body_bytes = 1024\n")
    body = {"data": "x" * 2048, "headers": {"content-type": "text/plain"}}

    async def scenario():
        async with running_gateway(tmp_path, None) as (gateway, client):
            before = (await client.post("/echo", **body)).status_code
            (tmp_path / "flux.toml").write_text("[limits]\nmax_body_bytes = 4096\n")
            await gateway.reload(gateway.project.reload())
            after = await client.post("/echo", **body)
            return before, after.status_code, await after.get_data(as_text=True)

    assert asyncio.run(scenario()) == (413, 200, "2048")


def test_freezing_the_heap_leaves_what_is_alive_out_of_later_collections():
    walked_before = len(gc.get_objects())
    try:
        freeze_heap()
        walked_after = len(gc.get_objects())
    finally:
        gc.unfreeze()
    assert walked_after < walked_before / 10


def test_a_reload_leaves_the_replaced_functions_collectable(tmp_path):
    # Frozen objects are never collected; a reload unfreezes first, so the replaced functions go
    # even when they sit in a reference cycle.
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})

    async def scenario():
        async with running_gateway(tmp_path, None) as (gateway, client):
            old = gateway.functions
            old.cycle = old
            replaced = weakref.ref(old)
            del old
            freeze_heap()  # as the server does once it has started
            shutdown = asyncio.Event()
            watcher = asyncio.create_task(_watch(gateway, shutdown, interval=0.05))
            await asyncio.sleep(0.1)  # the watcher has taken the files' fingerprint
            # A different size, so the change is seen however coarse the file system's mtimes are.
            (tmp_path / "functions" / "v.js").write_text("export default async function () { return {status: 200, body: 'replaced'}; }\n")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if gateway.functions is not replaced():
                    break
            await asyncio.sleep(0.1)  # the watcher freezes the heap again right after the swap
            answer = await (await client.post("/v")).get_data(as_text=True)
            shutdown.set()
            watcher.cancel()
            return answer, replaced() is None

    try:
        assert asyncio.run(scenario()) == ("replaced", True)
    finally:
        gc.unfreeze()


def _wait_for(condition, timeout: float = 10.0):
    async def wait() -> bool:
        for _ in range(int(timeout / 0.05)):
            if condition():
                return True
            await asyncio.sleep(0.05)
        return False
    return wait()


def test_the_watcher_keeps_reloading_after_a_file_it_cannot_read(tmp_path):
    # A function file that is not UTF-8 once stopped the watcher for good, with no word: every
    # later edit was ignored until flux dev restarted.
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"})

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken the files' fingerprint
            bad = tmp_path / "functions" / "bad.js"
            bad.write_bytes(b"export default async function () { return {body: '\xe9'}; }\n")
            await asyncio.sleep(0.3)
            bad.unlink()
            (tmp_path / "functions" / "w.js").write_text("export default async function () { return {status: 200, body: 'new'}; }\n")
            reloaded = await _wait_for(lambda: "w" in gateway.functions.compiled)
            alive = not watcher.done()
            return reloaded, alive, await (await client.post("/w")).get_data(as_text=True)

    assert asyncio.run(scenario()) == (True, True, "new")


def test_a_burst_of_writes_is_reloaded_once_it_has_settled_never_part_way(tmp_path):
    """A deploy copying a tree (or a checkout, an editor's several writes) was read part-way: the
    version swapped in had some files new and others old, and served that mix until the next poll."""
    names = [f"f{i}" for i in range(10)]

    def source(generation: int) -> str:
        return f"export default async function () {{ return {{status: 200, body: 'g{generation}'}}; }}\n"

    write_project(tmp_path, {name: source(0) for name in names})
    swapped: list[set[str]] = []  # the generations each version swapped in holds

    def copy_tree() -> None:
        for generation in range(1, 6):
            for name in names:
                (tmp_path / "functions" / f"{name}.js").write_text(source(generation))
                time.sleep(0.005)

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            gateway.reload_hooks.append(lambda project: swapped.append(
                {re.search(r"'(g\d+)'", f.source).group(1) for f in project.functions.values()}))
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            await asyncio.to_thread(copy_tree)
            await _wait_for(lambda: swapped and swapped[-1] == {"g5"})
            return [await (await client.post(f"/{name}")).get_data(as_text=True) for name in names]

    assert asyncio.run(scenario()) == ["g5"] * len(names)
    assert all(len(generations) == 1 for generations in swapped), swapped


def test_an_editors_lock_file_in_functions_does_not_stop_a_reload(tmp_path):
    """Emacs keeps `.#NAME.js` beside a file with unsaved changes: read as a function, its name was a
    config error, and every save of another file was `not reloaded` until the lock went."""
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }",
                             "w": "export default async function () { return {status: 200}; }"})

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            (tmp_path / "functions" / ".#w.js").symlink_to("user@host.4242:1700000000")
            (tmp_path / "functions" / "v.js").write_text("export default async function () { return {status: 200, body: 'two'}; }\n")
            await _wait_for(lambda: gateway.project.functions["v"].source.find("two") > 0 or gateway.reload_error, 5)
            return gateway.reload_error, await (await client.post("/v")).get_data(as_text=True)

    assert asyncio.run(scenario()) == (None, "two")


def test_a_key_revoked_while_a_reload_runs_is_refused_before_that_reload_ends(tmp_path):
    """The watcher read nothing while a reload warmed slow top-level code: a key removed meanwhile
    was served for as long (5 s with the default time limit), and only then refused."""
    toml = '[tenants.acme]\napi_keys = ["key-one", "key-two"]\n[limits]\ntimeout_ms = 3000\n'
    write_project(tmp_path, {"v": "export default async function () { return {status: 200}; }"}, toml)

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            (tmp_path / "functions" / "spin.js").write_text("for (;;) {}\nexport default async function () {}\n")
            await _wait_for(lambda: gateway._incoming is not None, 5)  # the reload runs spin.js's top-level code
            (tmp_path / "flux.toml").write_text(toml.replace('"key-one", ', ""))
            loop = asyncio.get_running_loop()
            written = loop.time()
            while (await client.post("/v", headers={"x-flux-api-key": "key-one"})).status_code == 200:
                await asyncio.sleep(0.02)
            refused_after = loop.time() - written
            await _wait_for(lambda: "spin" in gateway.functions.compiled)
            kept = (await client.post("/v", headers={"x-flux-api-key": "key-two"})).status_code
            return refused_after, "spin" in gateway.functions.compiled, kept

    refused_after, reloaded, kept = asyncio.run(scenario())
    assert refused_after < 1.5 and reloaded and kept == 200


def test_a_request_waiting_for_a_worker_across_a_reload_runs_under_its_own_versions_limits(tmp_path):
    """It ran its own version's code under the new flux.toml's limits: a time limit lowered by the
    reload answered it 504, which neither version would have given it."""
    write_project(tmp_path, {"sl": """
        export default async function (req) {
          await new Promise((resolve) => setTimeout(resolve, Number(req.query.ms)));
          return {status: 200, body: "slept"};
        }"""}, "[limits]\ntimeout_ms = 5000\n")

    async def scenario():
        async with running_gateway(tmp_path, None, workers=1) as (gateway, client):
            running = asyncio.create_task(client.post("/sl?ms=1000"))
            await _wait_for(lambda: gateway.load()["running"] == 1, 5)
            waiting = asyncio.create_task(client.post("/sl?ms=500"))
            await _wait_for(lambda: gateway.load()["queued"] == 1, 5)
            (tmp_path / "flux.toml").write_text("[limits]\ntimeout_ms = 200\n")
            await gateway.reload(load_project(tmp_path))
            answers = [await running, await waiting]
            after = await client.post("/sl?ms=500")  # one that came after it: the new limit
            return [answer.status_code for answer in answers], after.status_code

    assert asyncio.run(scenario()) == ([200, 200], 504)


def test_a_rotated_secret_is_redacted_from_the_moment_its_flux_toml_is_read(tmp_path, dsn, conn):
    """While a reload warmed the new version (seconds, with slow top-level code), traces were redacted
    with the serving version's secrets alone: a client already given the rotated value sent it, and
    its trace kept it as it was."""
    ensure_schema(conn)
    rotated = "tok-rotated-7d1c9a2e"
    toml = '[secrets]\nTOKEN = "{}"\n[limits]\ntimeout_ms = 1500\n'
    write_project(tmp_path, {"v": "export default async function () { return {status: 200}; }"}, toml.format("tok-old-52b8e0f4"))

    async def scenario():
        writer = TraceWriter(dsn, flush_interval=0.01)
        await writer.start()
        async with running_gateway(tmp_path, None, sink=writer) as (gateway, client):
            (tmp_path / "functions" / "spin.js").write_text("for (;;) {}\nexport default async function () {}\n")
            (tmp_path / "flux.toml").write_text(toml.format(rotated))
            reload = asyncio.create_task(gateway.reload(load_project(tmp_path)))
            await asyncio.sleep(0.2)  # the reload runs spin.js's top-level code, to its time limit
            answer = await client.post(f"/v?token={rotated}", json={"token": rotated}, headers={"x-token": rotated})
            warming = not reload.done()
            await reload
        await writer.close()
        return warming, answer.headers["x-flux-request-id"]

    warming, request_id = asyncio.run(scenario())
    trace = conn.execute("SELECT to_jsonb(t)::text FROM flux.trace_requests t WHERE id = %s", (request_id,)).fetchone()[0]
    assert warming and rotated not in trace and "[secret]" in trace


def test_a_project_served_through_a_symlink_is_reloaded_when_it_is_pointed_at_another_release(tmp_path):
    """A deploy that swaps a `current` symlink to a new release was never seen: the watcher polled
    the directory the symlink named at start, and served the old release until a restart."""
    for release in ("v1", "v2"):
        write_project(tmp_path / release, {"r": f"export default async function () {{ return {{status: 200, body: '{release}'}}; }}"})
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")

    async def scenario():
        async with _watched(current, root=current) as (gateway, client, watcher):
            await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
            (tmp_path / "next").symlink_to(tmp_path / "v2")
            os.replace(tmp_path / "next", current)  # atomic, as deploy tools swap it
            await _wait_for(lambda: gateway.project.root == tmp_path / "v2", 5)
            return await (await client.post("/r")).get_data(as_text=True)

    assert asyncio.run(scenario()) == "v2"


def test_requests_are_served_while_a_reload_runs_slow_top_level_code(tmp_path):
    # A reload compiled every function and made its isolates on the loop: top-level code running
    # to its time limit stopped every request for that long.
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"},
                  "[limits]\ntimeout_ms = 1500\n")

    async def scenario():
        async with _watched(tmp_path) as (gateway, client, watcher):
            await asyncio.sleep(0.1)
            (tmp_path / "functions" / "spin.js").write_text(
                "for (;;) {}\nexport default async function () { return {status: 200}; }\n")
            slowest = 0.0
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.5
            while loop.time() < end:
                started = loop.time()
                answer = await client.post("/v")
                assert answer.status_code == 200
                slowest = max(slowest, loop.time() - started)
                await asyncio.sleep(0.02)
            reloaded = await _wait_for(lambda: "spin" in gateway.functions.compiled)
            return reloaded, slowest, gateway.functions.load_errors

    reloaded, slowest, errors = asyncio.run(scenario())
    assert reloaded and errors == ["functions/spin.js: its top-level code did not finish within 1500 ms"]
    assert slowest < 0.5


def test_reading_traces_from_a_server_that_says_nothing_fails_within_the_connect_timeout(monkeypatch):
    """Each GET /_flux/requests held a thread of the loop's default executor (which also makes
    isolates) for as long as the server stayed silent."""
    monkeypatch.setattr(server, "CONNECT_TIMEOUT", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        read = server.trace_reader(f"postgresql://nobody@127.0.0.1:{silent.getsockname()[1]}/none")
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            asyncio.run(asyncio.wait_for(read("default", None, {}), 10))
    assert time.monotonic() - started < 5


def test_a_reload_that_ends_after_the_stop_began_is_not_swapped_in(tmp_path):
    # The stop closes the functions it finds; a set swapped in after that would keep its isolates.
    write_project(tmp_path, {"v": "export default async function () { return {status: 200, body: 'one'}; }"},
                  "[limits]\ntimeout_ms = 1000\n")

    async def scenario():
        async with running_gateway(tmp_path, None) as (gateway, _):
            before = gateway.functions
            (tmp_path / "functions" / "spin.js").write_text("for (;;) {}\nexport default async function () {}\n")
            (tmp_path / "functions" / "w.js").write_text("export default async function () { return {status: 200}; }\n")
            reload = asyncio.create_task(gateway.reload(gateway.project.reload()))
            await asyncio.sleep(0.2)  # compiling spin.js, up to its time limit
            gateway.stop_starting()
            await reload
            return gateway.functions is before

    assert asyncio.run(scenario())


def test_a_reload_that_sets_retention_says_at_once_what_the_role_lacks_to_prune(tmp_path, dsn, conn, caplog):
    """The start check covers [retention]; a reload that added it was found wanting only by the
    hourly prune, an hour later, in a warning."""
    from flux.cdc.attach import attach
    from tests.cdc.test_roles import engine_role

    conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    attach(dsn, tables=["t"])
    write_project(tmp_path, {"v": "export default async function () { return {status: 200}; }"})
    with engine_role(conn, dsn, replication=False) as (role, role_dsn):
        conn.execute(f"GRANT USAGE ON SCHEMA flux TO {role}; GRANT SELECT ON flux.meta TO {role};"
                     f" GRANT SELECT, INSERT ON flux.trace_requests TO {role}")

        async def scenario() -> None:
            async with _watched(tmp_path, dsn=role_dsn) as (gateway, _, _):
                await asyncio.sleep(0.1)  # the watcher has taken its first fingerprint
                (tmp_path / "flux.toml").write_text('[retention]\ntraces = "30d"\n')
                await _wait_for(lambda: "[retention]" in caplog.text, 5)

        asyncio.run(scenario())
    [said] = [r for r in caplog.records if "[retention]" in r.getMessage()]
    assert said.levelname == "ERROR" and "cannot be applied" in said.getMessage()
    assert f'GRANT DELETE ON flux.trace_requests TO "{role}"' in said.getMessage()
