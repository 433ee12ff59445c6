"""Settings shared by the subcommands: flags first, then `BASTION_*` environment variables, then defaults.

One place decides where the CA, the SQLite database and the spool live (`--home`), and what the store and
audit URLs default to, so that `serve`, `dashboard`, `ca`, `run`, `approvals`, `locks` and `audit` always agree.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:8081"
DEFAULT_HOME = "~/.bastion"


class ConfigError(ValueError):
    """A flag or variable has a value Bastion cannot use. The message says which and why."""


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces is never implied: empty host means 127.0.0.1)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {value!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{what}: port out of range in {value!r}")
    return host, p


def env_or(value: str | None, var: str, default: str | None = None) -> str | None:
    if value is not None:
        return value
    return os.environ.get(var) or default


@dataclass(frozen=True)
class Home:
    """The `--home` directory: CA, SQLite database, audit spool."""

    path: Path

    @property
    def ca_cert(self) -> Path:
        return self.path / "mitmproxy-ca-cert.pem"

    @property
    def ca_bundle(self) -> Path:
        return self.path / "ca-bundle.pem"

    @property
    def database(self) -> Path:
        return self.path / "bastion.db"

    @property
    def spool(self) -> Path:
        return self.path / "spool"

    def ensure(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.path


def resolve_home(value: str | None) -> Home:
    raw = env_or(value, "BASTION_HOME", DEFAULT_HOME)
    assert raw is not None
    return Home(Path(raw).expanduser().absolute())


def resolve_store(value: str | None, home: Home) -> str:
    return env_or(value, "BASTION_STORE") or f"sqlite:///{home.database}"


def resolve_audit(value: str | None, store: str, home: Home) -> str:
    """The audit URL defaults to the store's SQLite file, or the home database when the store is not SQLite."""
    explicit = env_or(value, "BASTION_AUDIT")
    if explicit:
        return explicit
    return store if store.startswith("sqlite:") else f"sqlite:///{home.database}"


def resolve_rules(values: list[str] | None) -> list[str]:
    """`--rules` may repeat; `BASTION_RULES` may hold several paths separated by the OS path separator."""
    if values:
        return values
    env = os.environ.get("BASTION_RULES")
    return [p for p in env.split(os.pathsep) if p] if env else []


def sqlite_path(url: str) -> Path:
    """`sqlite:///rel/path.db` is relative to the working directory, `sqlite:////abs/path.db` absolute."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"not a sqlite URL: {url!r}")
    return Path(url[len("sqlite:///"):]).expanduser()


def add_home_args(parser: argparse.ArgumentParser, *, store: bool = True, audit: bool = True) -> None:
    parser.add_argument("--home", help=f"CA, database and spool directory (BASTION_HOME, default {DEFAULT_HOME})")
    if store:
        parser.add_argument("--store", help="lock/approval store URL: sqlite:///PATH or redis://HOST:PORT/DB "
                            "(BASTION_STORE, default the SQLite file under --home)")
    if audit:
        parser.add_argument("--audit", help="audit URL: sqlite:///PATH, postgresql://USER@HOST/DB or "
                            "jsonl:///DIR (BASTION_AUDIT, default the store's SQLite file)")


def add_rules_arg(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--rules", action="append", metavar="PATH", required=required,
                        help="rules file or directory; may repeat (BASTION_RULES)")


@dataclass(frozen=True)
class DataSettings:
    """Where the shared state lives, as every data-reading subcommand sees it."""

    home: Home
    store: str
    audit: str


def data_settings(args: argparse.Namespace) -> DataSettings:
    home = resolve_home(getattr(args, "home", None))
    store = resolve_store(getattr(args, "store", None), home)
    audit = resolve_audit(getattr(args, "audit", None), store, home)
    return DataSettings(home, store, audit)
