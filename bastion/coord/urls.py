"""Store URLs: which kind of store a URL names, and how to show one without its password.

A leaf of `bastion.coord`: it parses, it opens nothing and imports no backend, so the backends (which show
their URL in errors) and the factories in `bastion.coord` (which pick a backend by it) can both import it.
"""

from __future__ import annotations

from pathlib import Path

from bastion.config import ConfigError, sqlite_path
from bastion.coord.store import StoreURLError


def store_location(url: str) -> tuple[str, Path | str]:
    """("sqlite", file path) or ("redis", url) for a store URL; `StoreURLError` for anything else (no I/O)."""
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        try:
            path = sqlite_path(url)
        except ConfigError as e:
            raise StoreURLError(f"{e} (expected sqlite:///PATH)") from None
        if not path.name:
            raise StoreURLError(f"store URL {url!r} names no database file")
        return "sqlite", path
    if scheme in ("redis", "rediss"):
        return "redis", url
    raise StoreURLError(
        f"unsupported store URL {redact_url(url)!r}: expected sqlite:///PATH, "
        "redis://HOST:PORT/DB or rediss://HOST:PORT/DB"
    )


def redact_url(url: str) -> str:
    """`scheme://user:secret@host/x` -> `scheme://host/x`, so errors and logs never show a password."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
