"""Response headers that make every answer of the admin listener safe to show in a browser.

The Content-Security-Policy allows nothing by default and then only this listener's own scripts, styles,
images and connections: no inline script or style, no `on*=` handler can run even if an agent's data ever
reached a page unescaped. Set in `on_response_prepare`, so refusals raised as exceptions (403, 404) get them
too, and API answers are never cached.
"""

from __future__ import annotations

from aiohttp import web

CSP_DIRECTIVES = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "connect-src": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
}
CSP = "; ".join(f"{k} {v}" for k, v in CSP_DIRECTIVES.items())

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
