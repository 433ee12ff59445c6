"""Browser sessions for the dashboard: a user logs in with their user token and gets an encrypted cookie.

The cookie holds only the user's name, a CSRF token, an expiry and a tag of the user's token hash (a new
token in the rules ends the sessions begun with the old one), encrypted and authenticated with Fernet
(AES-CBC + HMAC, from the `cryptography` package) under a key kept in `<home>/dashboard.key` (0600), so every
dashboard process of a home accepts the others' sessions and a restart does not log people out. The name is
resolved against the *current* rules on every request: a reload that removes the user (or their roles) ends
their session at once. The token itself is never stored.

Cookie flags: HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure when the
request came over TLS, Path=/, Max-Age = `SESSION_SECONDS`. Login always issues a new session (no fixation).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography.fernet import Fernet, InvalidToken

COOKIE = "bastion_session"
SESSION_SECONDS = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf: str
    expires: float
    token: str = ""  # a prefix of the user's token_sha256 when the session began: a new token ends it


def load_key(home: Path | None) -> bytes:
    """The sessions' Fernet key: `<home>/dashboard.key`, created (0600) if missing; a process-local key when
    there is no home (sessions then end with the process)."""
    if home is None:
        return Fernet.generate_key()
    path = home / "dashboard.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return key


class SessionCodec:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def issue(self, user: str, token_sha256: str | None = None) -> tuple[str, Session]:
        session = Session(user, secrets.token_urlsafe(24), time.time() + SESSION_SECONDS, token_tag(token_sha256))
        blob = json.dumps({"u": session.user, "c": session.csrf, "e": session.expires, "t": session.token}).encode()
        return self._fernet.encrypt(blob).decode(), session

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 4096:
            return None
        try:
            data = json.loads(self._fernet.decrypt(cookie.encode(), ttl=SESSION_SECONDS + 60))
            session = Session(str(data["u"]), str(data["c"]), float(data["e"]), str(data.get("t", "")))
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None


def token_tag(token_sha256: str | None) -> str:
    """What a session remembers of the user's token: enough to notice it was replaced (rotating a user's token
    in the rules ends their sessions), never the token itself."""
    return (token_sha256 or "")[:16]


def set_cookie(response: web.StreamResponse, request: web.Request, value: str) -> None:
    response.set_cookie(COOKIE, value, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(COOKIE, path="/", samesite="Strict", secure=request.secure)
