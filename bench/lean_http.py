"""A minimal HTTP/1.1 upstream and load client for benchmarks that share a small machine with the proxy.

Why not aiohttp on both ends: on a 2-core machine an aiohttp client and server spend about 0.8 ms of CPU per
request between them, 40% of what the proxy itself spends, on the same cores the proxy and its audit worker
need. These speak just enough HTTP/1.1 for a fixed JSON exchange with Content-Length bodies over keep-alive
connections (plain, or TLS after a proxy CONNECT), at a fraction of that cost, so the measurement is of the
proxy rather than of the harness. Anything unexpected (a status other than 200, no Content-Length, a closed
connection) counts as an error and the connection is opened again.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from urllib.parse import unquote, urlsplit

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


# -- upstream -----------------------------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers every request on the connection with the same response, whatever was asked."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            m = _CONTENT_LENGTH.search(buf, 0, end + 2)
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(buf) < total:
                return
            del buf[:total]
            assert self._transport is not None
            self._transport.write(self._response)


async def serve_upstream(body: bytes, cert: str, key: str) -> tuple[int, int]:
    """Start the upstream on 127.0.0.1 (HTTP, HTTPS); returns their ports. Runs until the loop stops."""
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    plain = await loop.create_server(lambda: _Upstream(response), "127.0.0.1", 0)
    tls = await loop.create_server(lambda: _Upstream(response), "127.0.0.1", 0, ssl=ctx)
    return plain.sockets[0].getsockname()[1], tls.sockets[0].getsockname()[1]


# -- client -------------------------------------------------------------------------------------------------


class ProxyClient:
    """POSTs `body` to `url` through the HTTP proxy `proxy` (`http://user:pass@host:port`) on `conns`
    keep-alive connections, closed loop."""

    def __init__(self, url: str, proxy: str, body: bytes, headers: dict[str, str], cafile: str) -> None:
        target, via = urlsplit(url), urlsplit(proxy)
        self._tls = target.scheme == "https"
        self._host, self._port = target.hostname or "", target.port or (443 if self._tls else 80)
        self._proxy = (via.hostname or "", via.port or 8080)
        auth = base64.b64encode(f"{unquote(via.username or '')}:{unquote(via.password or '')}".encode()).decode()
        self._auth = f"Proxy-Authorization: Basic {auth}\r\n"
        self._ctx = ssl.create_default_context(cafile=cafile) if self._tls else None
        authority = f"{self._host}:{self._port}"
        line = f"POST {target.path} HTTP/1.1\r\n" if self._tls else f"POST {url} HTTP/1.1\r\n"
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._request = (line + f"Host: {authority}\r\n" + ("" if self._tls else self._auth) + fields
                         + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # kept between runs

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(*self._proxy)
        if self._tls:
            writer.write(f"CONNECT {self._host}:{self._port} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                         f"{self._auth}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"200":
                writer.close()
                raise ConnectionError(f"CONNECT refused: {head[:40]!r}")
            await writer.start_tls(self._ctx, server_hostname=self._host)  # type: ignore[arg-type]
        return reader, writer

    async def run(self, conns: int, seconds: float, latencies: list[float] | None = None) -> int:
        """Requests for `seconds`; appends each successful one's latency (s) to `latencies`; returns errors."""
        errors = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            conn = self._idle.pop() if self._idle else None
            while (t := time.perf_counter()) < deadline:
                try:
                    if conn is None:
                        conn = await self._open()
                    reader, writer = conn
                    writer.write(self._request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    m = _CONTENT_LENGTH.search(head)
                    if head[9:12] != b"200" or m is None:
                        raise ConnectionError(f"unexpected response: {head[:60]!r}")
                    await reader.readexactly(int(m.group(1)))
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
                    errors += 1
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    continue
                if latencies is not None:
                    latencies.append(time.perf_counter() - t)
            if conn is not None:
                self._idle.append(conn)

        await asyncio.gather(*(worker() for _ in range(conns)))
        return errors

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
