"""`flux init`: the scaffolded files, the overwrite rules, and the payment API stub it ships."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from glob import glob
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flux.cli import app
from flux.cli.init import template_files
from flux.errors import ConfigError
from flux.project import load_project

REPO = Path(__file__).resolve().parents[2]
FILES = [".gitignore", "flux.toml", "functions/create_user.js", "functions/hello.js", "schema.sql", "stubs/payments.py"]


def init(*args: str):
    return CliRunner().invoke(app, ["init", *args])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "myapp"
    result = init(str(root))
    assert result.exit_code == 0, result.output
    return root


@contextmanager
def stub(project: Path, *args: str) -> Iterator[int]:
    """Run the scaffolded stub on a free port (--port 0); yields the port it printed."""
    proc = subprocess.Popen(
        [sys.executable, str(project / "stubs" / "payments.py"), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", first)
        assert match, f"the stub did not print its address: {first!r}"
        yield int(match.group(1))
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def post(port: int, path: str, body: dict, *, timeout: float = 5) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_init_creates_every_project_file(project):
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == FILES


def test_init_creates_a_missing_directory_and_names_the_project_after_it(project):
    config = tomllib.loads((project / "flux.toml").read_text())
    assert config["project"]["name"] == "myapp"


def test_init_without_a_directory_scaffolds_the_current_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flux.toml").is_file() and (tmp_path / "functions" / "hello.js").is_file()
    assert "cd " not in result.output


def test_routes_of_the_scaffolded_flux_toml_point_at_existing_functions(project):
    config = tomllib.loads((project / "flux.toml").read_text())
    assert config["routes"] == {"POST /signup": "create_user"}
    for function in config["routes"].values():
        assert (project / "functions" / f"{function}.js").is_file()


def test_scaffolded_project_loads_with_a_fetch_timeout_inside_the_request_limit(project):
    loaded = load_project(project)
    assert loaded.route("POST", "/signup") == "create_user" and loaded.route("POST", "/hello") == "hello"
    assert loaded.fetch.tools == {"127.0.0.1:4010": "stripe"} and loaded.fetch.allow == ("127.0.0.1:4010",)
    assert loaded.fetch.timeout_ms < loaded.limits.timeout_ms
    assert loaded.setup_sql == project / "schema.sql" and "CREATE TABLE IF NOT EXISTS users" in loaded.setup_sql.read_text()
    assert loaded.tenants["default"].secrets == {"STRIPE_KEY": "sk_test_local_example"}


def test_scaffolded_gitignore_ignores_the_flux_state_directory(project):
    assert ".flux/" in (project / ".gitignore").read_text().splitlines()


def test_init_prints_what_it_created_and_the_next_steps(tmp_path):
    out = init(str(tmp_path / "myapp")).output
    for rel in FILES:
        assert f"+ {rel}" in out
    assert "cd " in out and "flux dev" in out and "python3 stubs/payments.py" in out
    assert "curl -s http://127.0.0.1:8000/signup" in out and "ada@example.com" in out


def test_init_in_a_directory_named_with_an_escape_sequence_shows_it_escaped_and_a_cd_that_pastes_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init("app\x1b[2J\nx")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert 'Created Flux project "app\\u001b[2J\\nx" in app\\u001b[2J\\nx' in result.output
    assert "  cd $'app\\x1b[2J\\nx'" in result.output.splitlines()


def test_every_curl_with_a_json_body_in_the_scaffold_says_it_is_json(project):
    # Without the header curl sends form data, which a function reads as text, not as JSON.
    calls = [line for path in project.rglob("*") if path.is_file() for line in path.read_text().splitlines()
             if "curl " in line and "-d '{" in line]
    assert calls
    assert all("-H 'content-type: application/json'" in line for line in calls), calls


def test_init_refuses_to_overwrite_existing_files_without_force(project):
    (project / "flux.toml").write_text("# mine\n")
    result = init(str(project))
    assert isinstance(result.exception, ConfigError)
    assert "flux.toml" in str(result.exception) and "--force" in result.exception.hint
    assert (project / "flux.toml").read_text() == "# mine\n"


def test_init_refuses_before_writing_anything(tmp_path):
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "hello.js").write_text("// mine\n")
    assert isinstance(init(str(tmp_path)).exception, ConfigError)
    assert not (tmp_path / "flux.toml").exists() and not (tmp_path / "functions" / "create_user.js").exists()


def test_init_force_overwrites_template_files_and_leaves_other_files_alone(project):
    (project / "functions" / "hello.js").write_text("// mine\n")
    (project / "functions" / "other.js").write_text("// other\n")
    result = init(str(project), "--force")
    assert result.exit_code == 0, result.output
    assert "hello: req.body?.name" in (project / "functions" / "hello.js").read_text()
    assert (project / "functions" / "other.js").read_text() == "// other\n"
    assert "functions/hello.js (overwritten)" in result.output


def test_init_adds_flux_state_to_an_existing_gitignore_without_replacing_it(tmp_path):
    (tmp_path / ".gitignore").write_text("node_modules")
    result = init(str(tmp_path))
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".gitignore").read_text().splitlines()[0] == "node_modules"
    assert ".flux/" in (tmp_path / ".gitignore").read_text().splitlines()


def test_init_json_lists_the_created_files(tmp_path):
    result = init(str(tmp_path / "myapp"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["name"] == "myapp" and data["created"] == FILES and data["overwritten"] == []


def test_every_template_file_is_matched_by_the_wheels_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flux"]
    shipped = {p for pattern in patterns for p in glob(pattern, root_dir=REPO / "flux", recursive=True)}
    sources = {str(p.relative_to(REPO / "flux")) for p in (REPO / "flux" / "scaffold").rglob("*") if p.is_file()}
    assert sources and sources <= shipped
    assert len(template_files()) == len(sources)


def test_payments_stub_answers_post_customers_with_a_customer_id(project):
    with stub(project) as port:
        status, body = post(port, "/v1/customers", {"email": "ada@example.com"})
    assert status == 200 and body["id"].startswith("cus_") and body["email"] == "ada@example.com"


def test_payments_stub_answers_post_charges_with_a_charge_id(project):
    with stub(project) as port:
        status, body = post(port, "/v1/charges", {"amount": 1200})
    assert status == 200 and body["id"].startswith("ch_")


def test_payments_stub_answers_404_for_an_unknown_endpoint(project):
    with stub(project) as port:
        status, body = post(port, "/v1/refunds", {})
    assert status == 404 and "/v1/refunds" in body["error"]["message"]


def test_payments_stub_in_slow_mode_does_not_answer_within_a_second(project):
    with stub(project, "--slow") as port:
        with pytest.raises(TimeoutError):
            post(port, "/v1/customers", {"email": "ada@example.com"}, timeout=1)
