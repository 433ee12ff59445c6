"""Reachability of the real services integration tests use (Redis, PostgreSQL on 127.0.0.1).

The rule: with `CI=true` a test that needs a service FAILS when the service is unreachable (CI must never
pass by skipping); elsewhere it is SKIPPED with a reason saying what to start.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
POSTGRES_DSN = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int, hint: str) -> None:
    """Fail (CI) or skip (elsewhere) the calling test when `host:port` does not accept connections."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port} ({hint})"
    if in_ci():
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)


def require_command(name: str) -> None:
    """Fail (CI) or skip (elsewhere) the calling test when the program `name` is not installed."""
    if shutil.which(name) is not None:
        return
    if in_ci():
        pytest.fail(f"{name} is not installed; CI=true requires it (.ci/run installs it)", pytrace=False)
    pytest.skip(f"{name} is not installed")


def require_redis(db: int = 13) -> str:
    """A Redis URL for tests (a dedicated DB index); skip/fail as above when Redis is down."""
    require_service("Redis", REDIS_HOST, REDIS_PORT, "start it with: redis-server --port 6379")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def require_postgres() -> str:
    """The PostgreSQL DSN for tests (user postgres, database `test`); skip/fail as above when it is down."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT,
                    "start it and create database `test` for user postgres with trust auth")
    return POSTGRES_DSN
