"""Who is calling the admin API: a user token from the rules (`users:`), sent as `Authorization: Bearer`.

Every `/api/` route needs a valid token (401 otherwise); routes that change things also check the user's
roles (403). Tokens are compared by sha256 in constant time by the policy; the token itself is never logged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from aiohttp import web

USER: web.RequestKey[Any] = web.RequestKey("bastion_user", object)
"""`request[USER]`: the authenticated `UserSpec` (set by the middleware on every /api/ request)."""


class UserDirectory(Protocol):
    """What authentication needs from a policy (`bastion.policy.engine.Policy` provides it)."""

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


def auth_middleware(directory: Callable[[], UserDirectory], prefix: str = "/api/") -> Any:
    """Authenticate every request under `prefix` against the *current* policy's users."""

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not request.path.startswith(prefix):
            return await handler(request)
        token = bearer_token(request)
        if token is None:
            return unauthorized("This API needs a user token: send 'Authorization: Bearer <token>'.")
        user = directory().authenticate_user(token)
        if user is None:
            return unauthorized("Unknown or invalid user token.")
        request[USER] = user
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
