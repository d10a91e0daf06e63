"""compose.yaml and the Dockerfile: a PostgreSQL ready for logical decoding, and `flux serve` wired to it."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())["services"]


def _settings(command: list[str]) -> dict[str, str]:
    """`-c name=value` pairs of a postgres command line."""
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "-c")


def test_db_runs_postgres_14_or_newer(services):
    name, _, tag = services["db"]["image"].partition(":")
    assert name == "postgres"
    assert int(re.match(r"\d+", tag).group()) >= 14


def test_db_runs_with_logical_wal_level_and_spare_replication_slots(services):
    command = services["db"]["command"]
    assert command[0] == "postgres"
    settings = _settings(command)
    assert settings["wal_level"] == "logical"
    assert int(settings["max_replication_slots"]) >= 2 and int(settings["max_wal_senders"]) >= 2


def test_db_keeps_its_data_in_a_named_volume():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    [mount] = compose["services"]["db"]["volumes"]
    volume, _, target = mount.partition(":")
    assert target == "/var/lib/postgresql/data" and volume in compose["volumes"]


def test_db_has_a_pg_isready_healthcheck(services):
    test = services["db"]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "pg_isready" in " ".join(test[1:])


def test_flux_starts_only_after_the_db_is_healthy(services):
    assert services["flux"]["depends_on"]["db"]["condition"] == "service_healthy"


def test_flux_database_url_points_at_the_db_service_with_its_password(services):
    url = urlsplit(services["flux"]["environment"]["FLUX_DATABASE_URL"])
    assert url.scheme in ("postgres", "postgresql") and url.hostname == "db" and (url.port or 5432) == 5432
    assert url.password == services["db"]["environment"]["POSTGRES_PASSWORD"]


def test_flux_serves_on_all_interfaces_at_the_published_port(services):
    flux = services["flux"]
    command = flux["command"]
    assert command[:2] == ["flux", "serve"] and "--attach" in command  # serve needs an attached database
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in flux["ports"]


def test_flux_mounts_a_project_at_its_working_directory(services):
    flux = services["flux"]
    assert any(mount.split(":")[-1] == flux["working_dir"] for mount in flux["volumes"])


def test_flux_is_built_from_the_dockerfile_which_installs_the_package(services):
    assert services["flux"]["build"] in (".", {"context": "."})
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", dockerfile, re.M)
    assert re.search(r"^RUN pip install \.(\s|$)", dockerfile, re.M)
    assert "COPY flux " in dockerfile and "COPY pyproject.toml" in dockerfile


def test_payments_stub_shares_the_flux_network_so_the_example_reaches_it_on_localhost(services):
    payments = services["payments"]
    assert payments["network_mode"] == "service:flux" and "stubs/payments.py" in payments["command"]


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".flux", ".git"} <= ignored


def test_flux_is_given_the_time_a_stop_takes_before_docker_kills_it(services):
    """Docker's default of 10 s killed a stop that waits for functions and writes their traces."""
    from flux.cli.serve import ENGINE_STOP_SECONDS
    from flux.gateway.server import ServeConfig, stop_bound
    from flux.project import load_project

    limits = load_project(REPO / "examples" / "app").limits
    grace = int(services["flux"]["stop_grace_period"].removesuffix("s"))
    drain = ServeConfig.__dataclass_fields__["drain_timeout"].default
    assert grace >= stop_bound(limits.timeout_ms, drain) + ENGINE_STOP_SECONDS
