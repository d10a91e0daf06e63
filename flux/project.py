"""A Flux project on disk: `flux.toml` plus `functions/*.js`, resolved once into frozen config.

This module reads files and environment variables and nothing else: it does not compile
JavaScript (that is `flux.runtime.isolate`) and it does not serve anything. A function's
source is read when the project is loaded; `Project.reload()` returns a new Project, so a
request in flight keeps the code it started with.

Config errors name the file and the key, with a hint. Function *syntax* errors are not config
errors: the project still loads, the broken function is reported, and its route answers 500.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from flux.errors import ConfigError

CONFIG_FILE = "flux.toml"
FUNCTIONS_DIR = "functions"
DEFAULT_TENANT = "default"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")  # \Z: `$` also matches before a final newline
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_ms: int = 5000
    memory_mb: int = 128
    max_body_bytes: int = 1024 * 1024
    record_body_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class Retention:
    """How long recorded data is kept (`[retention]`); None keeps it for good."""

    traces: timedelta | None = None
    mutations: timedelta | None = None


@dataclass(frozen=True, slots=True)
class FetchConfig:
    allow: tuple[str, ...] | None = None  # None: every host is allowed
    timeout_ms: int = 10_000
    tools: dict[str, str] = field(default_factory=dict)  # host or host:port -> tool name


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    api_keys: tuple[str, ...] = ()
    secrets: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    path: Path
    source: str
    code_version: str  # sha256 of the source, 16 hex chars

    @property
    def display_path(self) -> str:
        return f"{FUNCTIONS_DIR}/{self.path.name}"


@dataclass(frozen=True, slots=True)
class Project:
    root: Path
    name: str
    functions: dict[str, Function]
    routes: dict[tuple[str, str], str]  # (METHOD, /path) -> function name
    limits: Limits
    fetch: FetchConfig
    tenants: dict[str, Tenant]
    git_commit: str | None
    setup_sql: Path | None = None
    retention: Retention = Retention()
    # API key -> tenant. A lookup by hash: comparing a presented key with each configured one in turn
    # takes longer the more leading characters match, a timing a caller could measure.
    _tenant_by_key: dict[str, Tenant] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        by_key: dict[str, Tenant] = {}
        for tenant in self.tenants.values():
            for key in tenant.api_keys:
                by_key.setdefault(key, tenant)
        object.__setattr__(self, "_tenant_by_key", by_key)

    @property
    def requires_api_key(self) -> bool:
        return any(t.api_keys for t in self.tenants.values())

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant a request with API key `key` is served as; None when there is none (a 401)."""
        if not self.requires_api_key:
            return self.tenants.get(DEFAULT_TENANT)  # load_project makes sure there is one
        if not key:
            return None
        return self._tenant_by_key.get(key)

    def route(self, method: str, path: str) -> str | None:
        """The function routed at `method path`. A GET route answers HEAD too, as RFC 9110 asks of a
        server (the function sees `req.method` HEAD); a `"HEAD /path"` route of its own comes first."""
        method, path = method.upper(), path.rstrip("/") or "/"
        return self.routes.get((method, path)) or (self.routes.get(("GET", path)) if method == "HEAD" else None)

    def methods_at(self, path: str) -> list[str]:
        """The methods routed at `path`, sorted: what a 405's Allow lists (empty: the path has no route)."""
        path = path.rstrip("/") or "/"
        methods = {method for method, at in self.routes if at == path}
        return sorted(methods | {"HEAD"} if "GET" in methods else methods)

    def reload(self) -> Project:
        return load_project(self.root)

    def fingerprint(self) -> tuple:
        return fingerprint(self.root)


def fingerprint(root: Path) -> tuple:
    """Changes whenever flux.toml or a function file changes, the git repository's HEAD moves (a
    commit, a checkout), or `root`, a symlink, is pointed at another directory (a release swapped in):
    `flux dev` polls it, and a reload reads `git_commit` again, so that traces name the commit that
    holds their code, not the one before it."""
    real = root.resolve()
    files = [root / CONFIG_FILE, *function_files(root), *git_head_files(real)]
    return (str(real), *(stamp for stamp in map(_stamp, files) if stamp is not None))


def _stamp(path: Path) -> tuple[str, int, int] | None:
    """A file's path, mtime and size, from one stat; None when it is gone (a checkout deleting it
    between the listing and here)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path), stat.st_mtime_ns, stat.st_size


def function_files(root: Path) -> list[Path]:
    """The function files of the project at `root`: functions/*.js, less hidden ones. Those are
    editors' and the system's own, made while a file is edited (Emacs's lock `.#x.js`, macOS's `._x.js`):
    read as functions, their names were a config error that stopped every reload meanwhile."""
    return sorted(path for path in (root / FUNCTIONS_DIR).glob("*.js") if not path.name.startswith("."))


def find_project_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for directory in [here, *here.parents]:
        if (directory / CONFIG_FILE).is_file():
            return directory
    raise ConfigError(
        f"No {CONFIG_FILE} in {here} or its parents",
        hint="Run `flux init` to create a project, or cd into one.",
    )


def load_project(root: Path) -> Project:
    root = root.resolve()
    config_path = root / CONFIG_FILE
    try:
        config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"No {CONFIG_FILE} in {root}", hint="Run `flux init` to create a project.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                          hint="Save the file as UTF-8 (TOML requires it).") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid TOML: {exc}", hint="Fix the file and retry.") from None
    where = str(config_path)
    _check_keys(config, _TABLES, where, None)
    functions = _load_functions(root)
    routes = _routes(_table(config, "routes", where), functions, where)
    shared_secrets = _secrets(config.get("secrets", {}), where, "secrets")
    tenants = _tenants(_table(config, "tenants", where), shared_secrets, where)
    dev = _table(config, "dev", where)
    _check_keys(dev, _TABLES["dev"], where, "dev")
    project = _table(config, "project", where)
    _check_keys(project, _TABLES["project"], where, "project")
    return Project(
        root=root,
        name=_string(project, "name", root.name, where, "project"),
        functions=functions,
        routes=routes,
        limits=_limits(_table(config, "limits", where), where),
        fetch=_fetch(_table(config, "fetch", where), _table(config, "tools", where), where),
        tenants=tenants,
        git_commit=git_commit(root),
        setup_sql=root / dev["setup_sql"] if _string(dev, "setup_sql", "", where, "dev") else None,
        retention=_retention(_table(config, "retention", where), where),
    )


# The tables flux.toml may hold, each with the keys it may hold (None: any key, e.g. route specs).
_TABLES: dict[str, set[str] | None] = {
    "project": {"name"},
    "routes": None,
    "limits": {"timeout_ms", "memory_mb", "max_body_bytes", "record_body_bytes"},
    "fetch": {"allow", "timeout_ms"},
    "tools": None,
    "secrets": None,
    "tenants": None,
    "retention": {"traces", "mutations"},
    "dev": {"setup_sql"},
}
_TENANT_KEYS = {"api_keys", "secrets"}


def _check_keys(table: dict, known: Any, where: str, section: str | None) -> None:
    """A key Flux does not read is most likely a typo (`[limit]`, `alow`): refuse it rather than
    silently run with the default (an ignored `[fetch] allow` would allow every host)."""
    for key in table:
        if key in known:
            continue
        close = difflib.get_close_matches(key, list(known), n=1)
        if section is None:
            what = f"Unknown table [{key}] in" if isinstance(table[key], dict) else f"Unknown top-level key {key!r} in"
            hint = f"Did you mean [{close[0]}]?" if close else "flux.toml holds " + ", ".join(f"[{k}]" for k in known) + "."
        else:
            what = f"Unknown key {key!r} in [{section}] of"
            hint = f"Did you mean {close[0]}?" if close else f"[{section}] holds " + ", ".join(sorted(known)) + "."
        raise ConfigError(f"{what} {where}", hint=f'{hint} See README.md, "flux.toml".')


def _table(config: dict, key: str, where: str) -> dict:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] in {where} must be a table", hint=f"Write it as [{key}] with key = value lines.")
    return value


def _string(table: dict, key: str, default: str, where: str, section: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"[{section}] {key} in {where} must be a string, not {value!r}",
                          hint=f'Write it in quotes: {key} = "..."')
    return value


def _load_functions(root: Path) -> dict[str, Function]:
    functions = {}
    if (root / FUNCTIONS_DIR).exists() and not (root / FUNCTIONS_DIR).is_dir():  # it served no function, saying nothing
        raise ConfigError(f"{FUNCTIONS_DIR} in {root} is not a directory",
                          hint=f"{FUNCTIONS_DIR}/ is a directory holding one NAME.js file per function.",
                          file=str(root / FUNCTIONS_DIR))
    for path in function_files(root):
        name = path.stem
        if not _NAME.match(name):
            raise ConfigError(
                f"Function file name {path.name} is not a valid function name",
                hint="Use letters, digits, _ and -, starting with a letter or _.", file=str(path),
            )
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:  # deleted since the listing (an editor's save, a checkout): not a function now
            continue
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{FUNCTIONS_DIR}/{path.name} is not UTF-8 text: {exc.reason} at byte {exc.start}",
                              hint="Save the file as UTF-8.", file=str(path)) from None
        except OSError as exc:  # a directory named x.js, a file that cannot be read
            raise ConfigError(f"Cannot read {FUNCTIONS_DIR}/{path.name}: {exc.strerror or exc}",
                              hint="Function files are readable .js files in functions/.", file=str(path)) from None
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        functions[name] = Function(name=name, path=path, source=source, code_version=digest)
    return functions


def _routes(table: dict, functions: dict[str, Function], where: str) -> dict[tuple[str, str], str]:
    routes = {("POST", f"/{name}"): name for name in functions}
    given: dict[tuple[str, str], str] = {}  # route -> its spec in flux.toml
    for spec, target in table.items():
        method, _, path = str(spec).strip().partition(" ")
        method = method.upper()
        path = path.strip()
        if method not in _METHODS or not path.startswith("/"):
            raise ConfigError(
                f'Route "{spec}" in {where} is not "METHOD /path"',
                hint='Write routes like "POST /signup" = "create_user"; METHOD is one of ' + ", ".join(sorted(_METHODS)) + ".",
            )
        if path.rstrip("/") == "/_flux" or path.startswith("/_flux/"):
            raise ConfigError(f'Route "{spec}" in {where} is under /_flux/, which Flux keeps for its own endpoints '
                              "(/_flux/health, /_flux/metrics, /_flux/requests): the route would never be reached",
                              hint="Route the function at another path.")
        if not isinstance(target, str):
            raise ConfigError(f'Route "{spec}" in {where} must name one function, not {target!r}',
                              hint='Write routes like "POST /signup" = "create_user".')
        if target not in functions:
            raise ConfigError(
                f'Route "{spec}" points at function "{target}", which has no file',
                hint=f"Create {FUNCTIONS_DIR}/{target}.js or fix the route.", file=where,
            )
        key = (method, path.rstrip("/") or "/")
        if key in given and routes[key] != target:
            raise ConfigError(f'Routes "{given[key]}" and "{spec}" in {where} are the same route, to two functions',
                              hint="Methods match in any case and a trailing / is ignored: keep one of them.")
        given[key] = spec
        routes[key] = target
    return routes


def _positive_int(table: dict, key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} in {where} must be a positive integer, not {value!r}", hint=f"For example: {key} = {default}")
    return value


def _limits(table: dict, where: str) -> Limits:
    _check_keys(table, _TABLES["limits"], where, "limits")
    d = Limits()
    return Limits(
        timeout_ms=_positive_int(table, "timeout_ms", d.timeout_ms, where),
        memory_mb=_positive_int(table, "memory_mb", d.memory_mb, where),
        max_body_bytes=_positive_int(table, "max_body_bytes", d.max_body_bytes, where),
        record_body_bytes=_positive_int(table, "record_body_bytes", d.record_body_bytes, where),
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_DURATION = timedelta(days=36_500)  # 100 years; now() minus much more leaves timestamptz's range


def parse_duration(text: str, what: str) -> timedelta:
    """`30s`, `10m`, `2h`, `1d` (or `1.5h`) -> a timedelta; `what` names the setting in errors."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ConfigError(f"{what} {text!r} is not a duration", hint="Write a number and a unit: 30s, 10m, 2h, 1d.")
    try:
        window = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    except OverflowError:  # past timedelta's own range (about 2.7 million years)
        window = None
    if window is None or window > MAX_DURATION:
        raise ConfigError(f"{what} {text!r} is too long", hint=f"Give at most {MAX_DURATION.days}d (100 years).")
    return window


def parse_retention_period(text: str, what: str) -> timedelta:
    """A retention period: a duration in hours or days. Minutes and seconds are refused: "6m"
    read as six months would delete almost everything recorded."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:  # parse_duration's hint would offer the minutes and seconds refused below
        raise ConfigError(f"{what} {text!r} is not a duration", hint="Write a number and a unit, d or h: 30d, 12h.")
    period = parse_duration(text, what)
    if match.group(2) in "sm":
        amount, unit = match.group(1), _UNITS[match.group(2)]
        months = f" or {float(amount) * 30:g}d for {amount} months" if unit == "minutes" else ""
        raise ConfigError(
            f"{what} {text!r} is {amount} {unit}: a retention period is given in hours or days",
            hint=f"Write {amount}d for {amount} days{months}; to mean {amount} {unit}, give it in hours "
                 f"({period.total_seconds() / 3600:.4g}h).",
        )
    if period <= timedelta(0):  # now() minus nothing: everything recorded until now
        raise ConfigError(f"{what} {text!r} is not a positive duration", hint="Give a duration such as 30d or 12h.")
    return period


def _retention(table: dict, where: str) -> Retention:
    _check_keys(table, _TABLES["retention"], where, "retention")
    periods = {}
    for key in ("traces", "mutations"):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"[retention] {key} in {where} must be a positive duration, not {value!r}",
                              hint=f'For example: {key} = "30d"')
        periods[key] = parse_retention_period(value, f"[retention] {key} in {where}")
    return Retention(**periods)


def _fetch(table: dict, tools: dict, where: str) -> FetchConfig:
    allow = table.get("allow")
    if allow is not None and (not isinstance(allow, list) or not all(isinstance(h, str) for h in allow)):
        raise ConfigError(f"[fetch] allow in {where} must be a list of hosts", hint='For example: allow = ["api.stripe.com"]')
    _check_keys(table, _TABLES["fetch"], where, "fetch")
    for host, tool in tools.items():
        if not isinstance(tool, str) or not tool:
            raise ConfigError(f'[tools] "{host}" in {where} must be a tool name, not {tool!r}',
                              hint='Map host[:port] to a name: "api.stripe.com" = "stripe"')
    return FetchConfig(
        allow=tuple(h.lower() for h in allow) if allow is not None else None,
        timeout_ms=_positive_int(table, "timeout_ms", FetchConfig().timeout_ms, where),
        tools={host.lower(): tool for host, tool in tools.items()},
    )


def _secrets(table: Any, where: str, key: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] in {where} must be a table", hint="NAME = \"value\" or NAME = { env = \"VAR\" }")
    secrets = {}
    for name, spec in table.items():
        if isinstance(spec, str):
            value = spec
        elif isinstance(spec, dict) and set(spec) == {"env"} and isinstance(spec["env"], str):
            value = os.environ.get(spec["env"])
            if value is None:
                raise ConfigError(
                    f"Secret {name} reads ${spec['env']}, which is not set",
                    hint=f"export {spec['env']}=... before starting Flux.", file=where,
                )
        else:
            raise ConfigError(f"Secret {name} in [{key}] must be a string or {{ env = \"VAR\" }}", hint='See README.md, "flux.toml".')
        if not value:
            raise ConfigError(f"Secret {name} in [{key}] is empty", hint="An empty secret cannot be redacted; give it a value.")
        secrets[str(name)] = value
    return secrets


# What every client can present as an API key, as the gateway reads headers: printable ASCII (tabs and
# spaces inside), without the outer whitespace the HTTP server strips.
_HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?")


def _tenants(table: dict, shared: dict[str, str], where: str) -> dict[str, Tenant]:
    if not table:
        return {DEFAULT_TENANT: Tenant(DEFAULT_TENANT, (), dict(shared))}
    tenants = {}
    seen_keys: dict[str, str] = {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"[tenants.{name}] in {where} must be a table", hint='api_keys = ["..."]')
        _check_keys(spec, _TENANT_KEYS, where, f"tenants.{name}")
        keys = spec.get("api_keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"tenants.{name}.api_keys in {where} must be a list of strings", hint='api_keys = ["..."]')
        for key in keys:
            if not _HEADER_SAFE_KEY.fullmatch(key):  # never quoted: a key is a credential
                raise ConfigError(
                    f"An API key of tenant {name} in {where} is not printable ASCII, or starts or ends with a space",
                    hint="HTTP servers strip a header's outer spaces, and clients send other characters as bytes "
                         "the gateway reads otherwise (one character per byte, latin-1): give keys of ASCII "
                         "letters, digits and punctuation.")
            if key in seen_keys:
                raise ConfigError(f"An API key is shared by tenants {seen_keys[key]} and {name}", hint="Give each tenant its own keys.")
            seen_keys[key] = name
        secrets = {**shared, **_secrets(spec.get("secrets", {}), where, f"tenants.{name}.secrets")}
        tenants[str(name)] = Tenant(str(name), tuple(keys), secrets)
    if not seen_keys and DEFAULT_TENANT not in tenants:
        raise ConfigError(
            f"[tenants] in {where} gives no tenant api_keys, so every request would be served as tenant "
            f"{DEFAULT_TENANT}, which it does not define",
            hint=f'Give each tenant api_keys = ["..."], or name the one tenant [tenants.{DEFAULT_TENANT}].')
    return tenants


def git_head_files(root: Path) -> list[Path]:
    """The files that change when HEAD moves, in the git repository holding `root`: HEAD, the ref it
    names (a linked worktree's refs are in the common directory) and packed-refs. Empty outside one."""
    try:
        for directory in [root, *root.parents]:
            dot_git = directory / ".git"
            if dot_git.is_dir():
                git_dir = dot_git
                break
            if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: PATH"
                git_dir = directory / dot_git.read_text(encoding="utf-8").removeprefix("gitdir:").strip()
                break
        else:
            return []
        common = git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip() \
            if (git_dir / "commondir").is_file() else git_dir
        head = (git_dir / "HEAD").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    files = [git_dir / "HEAD", common / "packed-refs"]
    if head.startswith("ref:"):
        files.append(common / head.removeprefix("ref:").strip())
    return files


def git_commit(root: Path) -> str | None:
    """HEAD of the git repository holding `root`, or None when it is not one (or git is absent)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
