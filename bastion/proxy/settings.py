"""`bastion serve` settings: flags, then `BASTION_*` variables, then defaults, checked before anything starts.

Every problem here is a `ConfigError` with a message naming the flag (exit 2): a sidecar that starts with a
half-understood configuration is worse than one that refuses to start.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bastion.audit.tracing import DEFAULT_SERVICE_NAME, TRACES_PATH, TracingSettings
from bastion.config import (
    DEFAULT_ADMIN,
    DEFAULT_LISTEN,
    ConfigError,
    DataSettings,
    data_settings,
    env_or,
    parse_hostport,
    resolve_rules,
)

MAX_REQUEST_BODY = 32 << 20
"""Largest request body Bastion accepts (bytes); larger ones get 413 `request_too_large`, before the body is
read when Content-Length announces it, the moment it passes the limit otherwise. A body Bastion buffers (for
the rules, an approval or a lock) is never larger than this."""

STREAM_REQUEST_ABOVE = 1 << 20
"""Request bodies announced (Content-Length) larger than this, on calls a plain allow rule lets through, are
streamed to the upstream as they arrive instead of buffered: no rule can read a body that large."""

MAX_HEADER_BYTES = 64 << 10
"""Largest total size of a request's header block (bytes); larger ones get 431."""

HEADER_TIMEOUT = 60.0
"""Seconds a client connection may take to send a complete request head, from when it opened or its last
exchange ended (slowloris, idle keep-alive connections)."""

IDLE_TIMEOUT = 300.0
"""Seconds without a byte in either direction after which a connection is closed (tunnels, streams and
websockets included; a call held for approval is not idle)."""

SHUTDOWN_GRACE = 10.0
"""Seconds in-flight calls get to finish after SIGTERM/SIGINT before connections are cut."""

_STORE_SCHEMES = {"sqlite": None, "redis": 6379, "rediss": 6379}
_AUDIT_SCHEMES = {"sqlite": None, "jsonl": None, "postgresql": 5432, "postgres": 5432}


@dataclass(frozen=True)
class ServeSettings:
    rules: tuple[str, ...]
    listen: tuple[str, int]
    admin: tuple[str, int]
    data: DataSettings
    agent: str | None
    upstream_ca: Path | None
    protected: tuple[tuple[str, int], ...]  # store/audit services agents must never reach
    max_request_body: int = MAX_REQUEST_BODY
    max_header_bytes: int = MAX_HEADER_BYTES
    grace: float = SHUTDOWN_GRACE
    header_timeout: float = HEADER_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    response_facts: bool = True  # read LLM and MCP answers for usage and outcomes (`--response-facts`)
    tracing: TracingSettings | None = None  # `--otlp`: one span per exchange, sent by the audit worker


def service_address(url: str, what: str, schemes: dict[str, int | None]) -> tuple[str, int] | None:
    """Validate a store/audit URL; return its network `(host, port)`, or None for file-based URLs."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{what}: bad URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ConfigError(f"{what}: unsupported URL {url!r}: expected one of "
                          + ", ".join(f"{s}://" for s in schemes))
    default_port = schemes[scheme]
    if default_port is None:  # sqlite:///path, jsonl:///dir
        if not url.startswith(f"{parts.scheme}:///") or len(url) <= len(f"{parts.scheme}:///"):
            raise ConfigError(f"{what}: {url!r} needs a path, like {scheme}:///relative/path or "
                              f"{scheme}:////absolute/path")
        return None
    if not parts.hostname:
        if scheme.startswith("postgres"):
            return None  # a Unix-socket connection (host in the query): nothing reachable over TCP
        raise ConfigError(f"{what}: {url!r} has no host, like {scheme}://127.0.0.1:{default_port}/0")
    return parts.hostname.lower(), port or default_port


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    rules = resolve_rules(args.rules)
    if not rules:
        raise ConfigError("no rules: pass --rules PATH (file or directory) or set BASTION_RULES")
    listen = parse_hostport(env_or(args.listen, "BASTION_LISTEN", DEFAULT_LISTEN) or DEFAULT_LISTEN, "--listen")
    admin = parse_hostport(env_or(args.admin, "BASTION_ADMIN", DEFAULT_ADMIN) or DEFAULT_ADMIN, "--admin")
    if listen == admin and listen[1] != 0:
        raise ConfigError(f"--listen and --admin are the same address ({listen[0]}:{listen[1]})")
    data = data_settings(args)
    protected = []
    for url, what, schemes in ((data.store, "--store", _STORE_SCHEMES), (data.audit, "--audit", _AUDIT_SCHEMES)):
        addr = service_address(url, what, schemes)
        if addr is not None:
            protected.append(addr)
    agent = env_or(args.agent, "BASTION_AGENT")
    upstream_ca = env_or(args.upstream_ca, "BASTION_UPSTREAM_CA")
    ca_path = None
    if upstream_ca:
        ca_path = Path(upstream_ca).expanduser()
        if not ca_path.is_file():
            raise ConfigError(f"--upstream-ca: no such file: {upstream_ca}")
    header_timeout = seconds(env_or(getattr(args, "header_timeout", None), "BASTION_HEADER_TIMEOUT"),
                             "--header-timeout", HEADER_TIMEOUT)
    idle_timeout = seconds(env_or(getattr(args, "idle_timeout", None), "BASTION_IDLE_TIMEOUT"),
                           "--idle-timeout", IDLE_TIMEOUT)
    return ServeSettings(
        tracing=tracing_settings(getattr(args, "otlp", None)),
        response_facts=on_off(env_or(getattr(args, "response_facts", None), "BASTION_RESPONSE_FACTS"),
                              "--response-facts", True),
        header_timeout=header_timeout,
        idle_timeout=idle_timeout,
        rules=tuple(rules),
        listen=listen,
        admin=admin,
        data=data,
        agent=agent or None,
        upstream_ca=ca_path,
        protected=tuple(protected),
    )


MAX_SERVICE_NAME = 256


def tracing_settings(flag: str | None, environ: Mapping[str, str] = os.environ) -> TracingSettings | None:
    """Where spans go, following the OTLP exporter's variables; None: no tracing.

    `--otlp URL` (a collector's base URL; `/v1/traces` is added unless the path already ends with it; an empty
    value turns tracing off), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), else
    `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` added to its path). `OTEL_SDK_DISABLED=true` turns tracing off
    (the SDK would not record spans anyway), and so does `OTEL_TRACES_EXPORTER=none` without the flag.
    `OTEL_SERVICE_NAME` names the service ("bastion").
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        endpoint = None
    elif flag is not None:
        endpoint = _traces_url(flag, "--otlp", lenient=True) if flag.strip() else None
    elif environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        endpoint = None
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        endpoint = _checked_url(environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip(),
                                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    elif environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        endpoint = _traces_url(environ["OTEL_EXPORTER_OTLP_ENDPOINT"], "OTEL_EXPORTER_OTLP_ENDPOINT", lenient=False)
    else:
        endpoint = None
    if endpoint is None:
        return None
    service = environ.get("OTEL_SERVICE_NAME", "").strip()
    if len(service) > MAX_SERVICE_NAME:
        raise ConfigError(f"OTEL_SERVICE_NAME: at most {MAX_SERVICE_NAME} characters")
    return TracingSettings(endpoint, service or DEFAULT_SERVICE_NAME)


def _traces_url(base: str, what: str, *, lenient: bool) -> str:
    """`base` with the traces path added to its path (the OTLP exporter's rule for a generic endpoint);
    `lenient` leaves a URL that already ends with it alone."""
    parts = urlsplit(_checked_url(base.strip(), what))
    if lenient and parts.path.rstrip("/").endswith(TRACES_PATH):
        return urlunsplit(parts)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + TRACES_PATH))


def _checked_url(url: str, what: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ConfigError(f"{what}: bad URL {url!r}: {e}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: expected an http:// or https:// URL of an OTLP/HTTP collector, like "
                          f"http://127.0.0.1:4318, got {url!r}")
    return url


def on_off(value: str | None, flag: str, default: bool) -> bool:
    """`on`/`off` (also true/false, yes/no, 1/0), or `default` when not given."""
    if value is None or value == "":
        return default
    text = value.strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{flag}: expected on or off, got {value!r}")


def seconds(value: str | None, flag: str, default: float) -> float:
    """A positive number of seconds (at most a day), or `default` when not given."""
    if value is None or value == "":
        return default
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(f"{flag}: expected a number of seconds, got {value!r}") from None
    if not 1 <= n <= 86400:
        raise ConfigError(f"{flag}: must be between 1 and 86400 seconds, got {value}")
    return n


def proxy_url_from_env() -> str:
    """The proxy address `bastion run` points agents at when --proxy is not given."""
    host, port = parse_hostport(os.environ.get("BASTION_LISTEN") or DEFAULT_LISTEN, "BASTION_LISTEN")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{_bracket(host)}:{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
