"""flux.toml and functions/*.js resolved into a Project."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from flux.errors import ConfigError
from flux.project import DEFAULT_TENANT, Tenant, load_project
from tests.functions import write_project

FN = "export default async function () { return {status: 200}; }"


def test_every_function_gets_post_slash_name_and_flux_toml_adds_routes(tmp_path):
    write_project(tmp_path, {"create_user": FN, "hello": FN}, '[routes]\n"POST /signup" = "create_user"\n"GET /hi/" = "hello"\n')
    project = load_project(tmp_path)
    assert project.route("POST", "/signup") == "create_user"
    assert project.route("POST", "/create_user") == "create_user"
    assert project.route("get", "/hi") == "hello"
    assert project.route("GET", "/signup") is None


def test_a_function_file_name_ending_in_a_newline_is_not_a_valid_function_name(tmp_path):
    """`$` matches before a final newline: `x\\n.js` loaded as function "x\\n", a newline in its route, in
    metrics' labels and in every log line about it."""
    write_project(tmp_path, {"hello": FN})
    (tmp_path / "functions" / "x\n.js").write_text(FN)
    with pytest.raises(ConfigError, match="is not a valid function name"):
        load_project(tmp_path)


def test_a_route_to_a_missing_function_is_a_config_error_with_a_hint(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[routes]\n"POST /signup" = "create_user"\n')
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    assert "create_user" in str(info.value) and "functions/create_user.js" in info.value.hint


def test_a_route_with_a_method_flux_does_not_serve_is_a_config_error_listing_the_methods(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[routes]\n"ANY /hi" = "hello"\n')
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert "METHOD /path" in caught.value.message and "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT" in caught.value.hint


def test_a_malformed_route_is_a_config_error(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[routes]\n"signup" = "hello"\n')
    with pytest.raises(ConfigError, match="METHOD /path"):
        load_project(tmp_path)


@pytest.mark.parametrize("path", ["/_flux/metrics", "/_flux", "/_flux/mine/"])
def test_a_route_under_flux_own_endpoints_is_a_config_error(tmp_path, path):
    """Flux's /_flux/ endpoints are matched first: such a route was never reached, and nothing said so."""
    write_project(tmp_path, {"hello": FN}, f'[routes]\n"GET {path}" = "hello"\n')
    with pytest.raises(ConfigError, match="under /_flux/, which Flux keeps for its own endpoints"):
        load_project(tmp_path)


def test_without_tenants_every_request_is_the_default_tenant_with_shared_secrets(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[secrets]\nKEY = "v"\n')
    project = load_project(tmp_path)
    assert not project.requires_api_key
    assert project.tenant_for_key(None).name == DEFAULT_TENANT and project.tenant_for_key(None).secrets == {"KEY": "v"}


def test_tenants_are_found_by_api_key_and_get_their_own_secrets(tmp_path):
    write_project(tmp_path, {"hello": FN}, """
        [secrets]
        SHARED = "s"
        [tenants.acme]
        api_keys = ["k1"]
        [tenants.acme.secrets]
        OWN = "a"
        [tenants.globex]
        api_keys = ["k2"]
    """)
    project = load_project(tmp_path)
    assert project.tenant_for_key("k1").secrets == {"SHARED": "s", "OWN": "a"}
    assert project.tenant_for_key("k2").secrets == {"SHARED": "s"}
    assert project.tenant_for_key("nope") is None and project.tenant_for_key(None) is None


def test_tenants_without_api_keys_and_without_a_default_tenant_are_a_config_error(tmp_path):
    """Every request would be served as tenant `default`, which would not exist."""
    write_project(tmp_path, {"hello": FN}, '[tenants.acme.secrets]\nTOKEN = "t"\n')
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    assert "no tenant api_keys" in str(info.value) and "[tenants.default]" in info.value.hint


def test_tenants_without_api_keys_serve_the_default_tenant(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[tenants.default.secrets]\nTOKEN = "t"\n[tenants.acme]\n')
    assert load_project(tmp_path).tenant_for_key(None).secrets == {"TOKEN": "t"}


def test_finding_a_tenant_never_raises(tmp_path):
    """A Project built by other code than load_project, without a default tenant: no request may crash."""
    write_project(tmp_path, {"hello": FN})
    project = dataclasses.replace(load_project(tmp_path), tenants={"acme": Tenant("acme")})
    assert project.tenant_for_key(None) is None and project.tenant_for_key("k") is None


def test_a_project_built_with_other_tenants_finds_them_by_their_keys(tmp_path):
    """Keys are looked up by hash, in an index the project builds itself: one made by other code must have it too."""
    write_project(tmp_path, {"hello": FN}, '[tenants.a]\napi_keys = ["key-a"]\n')
    project = dataclasses.replace(load_project(tmp_path), tenants={"b": Tenant("b", ("key-b",))})
    assert project.tenant_for_key("key-b").name == "b"
    assert project.tenant_for_key("key-a") is None and project.tenant_for_key("key-") is None


def test_an_api_key_shared_by_two_tenants_is_refused(tmp_path):
    write_project(tmp_path, {"hello": FN}, '[tenants.a]\napi_keys = ["k"]\n[tenants.b]\napi_keys = ["k"]\n')
    with pytest.raises(ConfigError, match="shared by tenants a and b"):
        load_project(tmp_path)


@pytest.mark.parametrize("key", [" k-acme", "k-acme ", "cl\u00e9-acme", "k-acme\u2028"])
def test_an_api_key_clients_cannot_present_as_it_is_is_refused(tmp_path, key):
    """It loaded, and requests with it were 401s: HTTP servers strip a header's outer spaces, and
    the gateway reads a header one character per byte (curl's UTF-8 `\u00e9` arrives as two; a
    `\u2028` no client can send)."""
    write_project(tmp_path, {"hello": FN}, f'[tenants.acme]\napi_keys = ["{key}"]\n')
    with pytest.raises(ConfigError, match="An API key of tenant acme") as info:
        load_project(tmp_path)
    assert key.strip() not in str(info.value) + info.value.hint  # a key is a credential: never quoted


def test_a_secret_from_an_unset_environment_variable_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUX_TEST_UNSET", raising=False)
    write_project(tmp_path, {"hello": FN}, '[secrets]\nKEY = { env = "FLUX_TEST_UNSET" }\n')
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    assert "export FLUX_TEST_UNSET" in info.value.hint


def test_a_secret_reads_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_TEST_KEY", "from-env")
    write_project(tmp_path, {"hello": FN}, '[secrets]\nKEY = { env = "FLUX_TEST_KEY" }\n')
    assert load_project(tmp_path).tenant_for_key(None).secrets == {"KEY": "from-env"}


def test_code_version_is_a_hash_of_the_source_and_changes_with_it(tmp_path):
    write_project(tmp_path, {"hello": FN})
    before = load_project(tmp_path).functions["hello"].code_version
    (tmp_path / "functions" / "hello.js").write_text(FN + "\n// changed\n")
    after = load_project(tmp_path).functions["hello"].code_version
    assert len(before) == 16 and before != after


def test_git_commit_is_recorded_when_the_project_is_a_repository(tmp_path):
    import subprocess

    write_project(tmp_path, {"hello": FN})
    assert load_project(tmp_path).git_commit is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@x", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert load_project(tmp_path).git_commit == head


def test_without_limits_a_project_gets_the_documented_defaults(tmp_path):
    """README's flux.toml: 5000 ms per request, 128 MB per isolate, 1 MiB bodies, 64 KiB recorded."""
    write_project(tmp_path, {"hello": FN})
    limits = load_project(tmp_path).limits
    assert (limits.timeout_ms, limits.memory_mb, limits.max_body_bytes, limits.record_body_bytes) == (5000, 128, 1048576, 65536)


def test_invalid_limits_are_config_errors(tmp_path):
    write_project(tmp_path, {"hello": FN}, "[limits]\ntimeout_ms = 0\n")
    with pytest.raises(ConfigError, match="timeout_ms"):
        load_project(tmp_path)


def test_retention_periods_are_read_from_flux_toml(tmp_path):
    from datetime import timedelta

    write_project(tmp_path, {"a": FN}, '[retention]\ntraces = "30d"\nmutations = "12h"\n')
    retention = load_project(tmp_path).retention
    assert (retention.traces, retention.mutations) == (timedelta(days=30), timedelta(hours=12))
    write_project(tmp_path, {"a": FN}, "")
    assert load_project(tmp_path).retention.traces is None  # kept for good unless configured


@pytest.mark.parametrize("setting", ['traces = "a month"', "traces = 30", 'traces = "0d"', 'trace = "30d"', 'mutations = "6m"'])
def test_a_retention_setting_that_is_not_a_positive_duration_is_a_config_error(tmp_path, setting):
    write_project(tmp_path, {"a": FN}, f"[retention]\n{setting}\n")
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert "[retention]" in str(caught.value) and caught.value.hint


def test_a_retention_period_that_is_no_duration_is_offered_only_the_units_it_may_use():
    from flux.project import parse_retention_period

    with pytest.raises(ConfigError) as caught:
        parse_retention_period("a month", "--older-than")
    assert "is not a duration" in caught.value.message
    assert "30d" in caught.value.hint and "10m" not in caught.value.hint and "30s" not in caught.value.hint


@pytest.mark.parametrize(("toml", "named", "suggested"), [
    ("[limit]\ntimeout_ms = 100\n", "[limit]", "[limits]"),
    ("[limits]\ntimeout = 100\n", "'timeout' in [limits]", "timeout_ms"),
    ('[fetch]\nalow = ["127.0.0.1:4010"]\n', "'alow' in [fetch]", "allow"),
    ('[tenants.acme]\napi_key = ["k"]\n', "'api_key' in [tenants.acme]", "api_keys"),
    ('[project]\nnmae = "x"\n', "'nmae' in [project]", "name"),
    ('[dev]\nsetup = "schema.sql"\n', "'setup' in [dev]", "setup_sql"),
    ('[retention]\ntrace = "30d"\n', "'trace' in [retention]", "traces"),
    ('name = "x"\n', "top-level key 'name'", "[project]"),
])
def test_a_key_flux_does_not_read_is_a_config_error_that_names_the_key_it_resembles(tmp_path, toml, named, suggested):
    write_project(tmp_path, {"hello": FN}, toml)
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert named in caught.value.message and suggested in caught.value.hint


@pytest.mark.parametrize(("toml", "named"), [
    ('[routes]\n"POST /x" = ["hello"]\n', 'Route "POST /x"'),
    ('[routes]\n"POST /x" = 3\n', 'Route "POST /x"'),
    ('routes = "POST /x"\n', "[routes]"),
    ('tenants = "acme"\n', "[tenants]"),
    ("[dev]\nsetup_sql = 3\n", "[dev] setup_sql"),
    ('[tools]\n"127.0.0.1:4010" = 3\n', "[tools]"),
    ("[project]\nname = 3\n", "[project] name"),
    ('[secrets]\nA = { env = "HOME", default = "x" }\n', "Secret A"),
])
def test_a_value_of_the_wrong_type_is_a_config_error_not_a_crash(tmp_path, toml, named):
    write_project(tmp_path, {"hello": FN}, toml)
    with pytest.raises(ConfigError) as caught:
        load_project(tmp_path)
    assert named in caught.value.message and caught.value.hint


def test_two_spellings_of_one_route_to_two_functions_are_a_config_error(tmp_path):
    write_project(tmp_path, {"a": FN, "b": FN}, '[routes]\n"POST /x" = "a"\n"post /x/" = "b"\n')
    with pytest.raises(ConfigError, match="same route"):
        load_project(tmp_path)


def test_a_function_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    write_project(tmp_path, {"hello": FN})
    (tmp_path / "functions" / "latin.js").write_bytes(b"export default async function () { return {body: 'caf\xe9'}; }")
    with pytest.raises(ConfigError, match="functions/latin.js is not UTF-8"):
        load_project(tmp_path)


def test_hidden_files_in_functions_are_not_functions(tmp_path):
    """An editor's lock file (Emacs's `.#hello.js`, a dangling symlink) or macOS's `._hello.js` was
    read as a function whose name is a config error: the project did not load, nor reload."""
    write_project(tmp_path, {"hello": FN})
    (tmp_path / "functions" / ".#hello.js").symlink_to("user@host.4242:1700000000")
    (tmp_path / "functions" / "._hello.js").write_bytes(b"\x00\x05\x16\x07")
    assert list(load_project(tmp_path).functions) == ["hello"]


def test_the_fingerprint_of_files_deleted_while_it_is_taken_leaves_them_out(tmp_path):
    """A file deleted between its listing and its stat (a checkout) raised FileNotFoundError, and
    the reload said `Flux failed while loading the project`, with a traceback."""
    write_project(tmp_path, {"hello": FN})
    project = load_project(tmp_path)
    churned = [tmp_path / "functions" / f"churn{i}.js" for i in range(20)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for path in churned:
                path.write_text(FN)
            for path in churned:
                path.unlink()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            project.fingerprint()
    finally:
        stop.set()
        thread.join()
    assert [Path(stamp[0]).name for stamp in project.fingerprint()[1:]] == ["flux.toml", "hello.js"]  # after the root


def test_a_functions_path_that_is_a_file_is_a_config_error(tmp_path):
    """It served no function, and flux dev said `functions: none yet: add functions/NAME.js`."""
    (tmp_path / "flux.toml").write_text('[project]\nname = "t"\n')
    (tmp_path / "functions").write_text("export default async function () {}\n")
    with pytest.raises(ConfigError, match="^functions in .* is not a directory "):
        load_project(tmp_path)


def test_a_flux_toml_that_is_not_utf8_is_a_config_error(tmp_path):
    write_project(tmp_path, {"hello": FN})
    (tmp_path / "flux.toml").write_bytes(b'[project]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_project(tmp_path)
