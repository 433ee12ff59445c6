"""A local upstream for trying Bastion: every method, every path, answered with a JSON echo of the request.

    python3 examples/echo_upstream.py --port 9000

The README's tour points agents at it through Bastion. Unlike a static file server it accepts POST, PUT,
PATCH and DELETE, so each call the rules let through visibly reaches it, and the echo shows what Bastion
forwarded (the `Bastion-Fence` header of a call that holds a task lock, for instance). Standard library only;
it listens on 127.0.0.1 unless told otherwise. Request bodies are capped (413 above the cap), and the echo
shows at most the first few KiB of one.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # bytes accepted in one request
ECHO_BODY = 4096  # bytes of the body shown in the echo
MAX_CHUNK_LINE = 1024


class BodyTooLarge(Exception):
    pass


class BadRequest(Exception):
    pass


class EchoHandler(BaseHTTPRequestHandler):
    """Answers any method with `{"method", "path", "query", "body", "body_bytes", "headers"}`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real API would; every answer has a Content-Length
    server_version = "echo-upstream"

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length < 0:
            raise BadRequest("bad Content-Length")
        if length > MAX_BODY:
            raise BodyTooLarge
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                while self.rfile.readline(MAX_CHUNK_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            if size < 0 or len(body) + size > MAX_BODY:
                raise BodyTooLarge
            body += self.rfile.read(size)
            self.rfile.readline(MAX_CHUNK_LINE)

    def _answer(self, status: int, payload: dict[str, object]) -> None:
        data = (json.dumps(payload, ensure_ascii=False) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _echo(self) -> None:
        try:
            body = self._read_body()
        except BodyTooLarge:
            self.close_connection = True  # the unread body would be taken for the next request
            self._answer(413, {"error": f"request body over {MAX_BODY} bytes"})
            return
        except BadRequest as e:
            self.close_connection = True
            self._answer(400, {"error": str(e)})
            return
        path, _, query = self.path.partition("?")
        self._answer(200, {
            "method": self.command,
            "path": path,
            "query": query,
            "body": body[:ECHO_BODY].decode("utf-8", "replace"),
            "body_bytes": len(body),
            "headers": {name.lower(): value for name, value in self.headers.items()},
        })

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _echo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer every HTTP request with a JSON echo of it.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000; 0: any free)")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), EchoHandler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"echo upstream on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
