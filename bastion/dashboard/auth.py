"""Who is calling the admin listener, and may they: user tokens from the rules (`users:`), two ways.

- Programs send `Authorization: Bearer <token>` to `/api/...` (401 without a valid one).
- Browsers log in once at `/login` with the same token and then carry a session cookie (`session.py`); it
  works for pages and for `/api/...`. A request that carries a Bearer token is judged by it alone.

Every page and every `/api/` route needs one of the roles viewer, approver or admin (a user with none of them
reads nothing: 403); routes that change things check more (`require`). Tokens are compared by sha256 in
constant time by the policy and never logged.

A cookie is sent by the browser on its own, so every unsafe request (POST, ...) authenticated by the cookie
must also prove it comes from a Bastion page: the session's CSRF token (form field `csrf` or header
`X-CSRF-Token`), and a same-origin `Sec-Fetch-Site` (or, where browsers do not send it, an `Origin` equal to
this listener). `/healthz`, `/readyz`, `/metrics`, `/login` and `/static/` are public.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from aiohttp import web

from bastion.dashboard.session import COOKIE, Session, SessionCodec, token_tag

USER: web.RequestKey[Any] = web.RequestKey("bastion_user", object)
"""`request[USER]`: the authenticated `UserSpec` (set by the middleware on every non-public request)."""
SESSION: web.RequestKey[Any] = web.RequestKey("bastion_session", object)
"""`request[SESSION]`: the browser `Session`, or None for a Bearer request."""

READERS = ("role:viewer", "role:approver", "role:admin")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/favicon.ico"})
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class UserDirectory(Protocol):
    """What authentication needs from a policy (`bastion.policy.engine.Policy` provides it)."""

    users: Any

    def authenticate_user(self, token: str) -> Any: ...

    def user_matches(self, user: Any, selectors: Iterable[str]) -> bool: ...


def json_error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def unauthorized(message: str) -> web.Response:
    return json_error(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="bastion"'})


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def same_origin(request: web.Request) -> bool:
    """Did a page of this listener send this request? Fetch metadata first; `Origin` where it is missing
    (browsers send `Sec-Fetch-*` only to trustworthy origins: HTTPS or localhost)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    parts = urlsplit(origin)
    return parts.scheme == request.scheme and parts.netloc == request.host


async def csrf_token_of(request: web.Request) -> str | None:
    header = request.headers.get("X-CSRF-Token")
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get("csrf")
        return value if isinstance(value, str) else None
    return None


def auth_middleware(directory: Callable[[], UserDirectory], codec: SessionCodec) -> Any:
    """Authenticate every non-public request against the *current* policy's users."""

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        path = request.path
        if is_public(path):
            return await handler(request)
        api = path.startswith("/api/")
        policy = directory()
        token = bearer_token(request)
        session: Session | None = None
        if token is not None:
            user = policy.authenticate_user(token)
            if user is None:
                return unauthorized("Unknown or invalid user token.")
        else:
            session = codec.read(request.cookies.get(COOKIE))
            user = policy.users.get(session.user) if session is not None else None
            if user is not None and session is not None and session.token != token_tag(user.token_sha256):
                user = None  # the user's token was replaced since this session began
            if user is None:
                if api:
                    return unauthorized("This API needs a user token: send 'Authorization: Bearer <token>'.")
                if request.method == "GET":
                    target = request.rel_url.path_qs
                    raise web.HTTPSeeOther(f"/login?next={quote(target, safe='')}")
                raise web.HTTPSeeOther("/login")
            if request.method in UNSAFE:
                given = await csrf_token_of(request)
                if path == "/logout" and same_origin(request):
                    given = session.csrf  # logging out needs no token (a user without a role has no page)
                if not same_origin(request) or given is None or not hmac.compare_digest(given, session.csrf):
                    return json_error(403, "csrf", "This request did not come from a Bastion page (missing or "
                                                   "wrong CSRF token); reload the page and try again.")
        request[USER] = user
        request[SESSION] = session
        if not policy.user_matches(user, READERS) and path != "/logout":
            if api:
                return json_error(403, "forbidden", f"User {user.name!r} has none of the roles viewer, approver "
                                                    "or admin, so Bastion shows them nothing.")
            raise web.HTTPForbidden(text=f"User {user.name} has none of the roles viewer, approver or admin, so "
                                         "Bastion shows them nothing. Ask an admin for a role.")
        return await handler(request)

    return middleware


def require(request: web.Request, directory: UserDirectory, selectors: Iterable[str], action: str) -> None:
    """Raise 403 unless the authenticated user matches one of `selectors` ("alice", "role:admin", "*")."""
    user = request[USER]
    selectors = tuple(selectors)
    if not directory.user_matches(user, selectors):
        needed = " or ".join(s.removeprefix("role:") + (" role" if s.startswith("role:") else "") for s in selectors)
        raise web.HTTPForbidden(
            text=json.dumps({"type": "error", "error": {
                "type": "forbidden", "message": f"{action} needs the {needed}; user {user.name!r} lacks it."}}),
            content_type="application/json")
