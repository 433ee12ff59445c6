"""Run `bastion serve` as a real subprocess for integration tests.

Both listeners bind port 0 and the startup line tells the real ports, so parallel runs never race for a port.
`run_bastion` waits until `/readyz` answers 200 and stops the process with SIGTERM on exit (killing it only
if it hangs). Output goes to files under the server's directory: `server.logs()` reads them, for tests that
assert on log lines and for debugging a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

REPO = Path(__file__).resolve().parents[2]
STARTUP_LINE = re.compile(r"proxy on http://(?P<proxy>[^,\s]+), admin on http://(?P<admin>[^\s]+)")

# Variables that would change how the server or the clients in a test behave.
_SCRUB = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
          "CURL_CA_BUNDLE")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BASTION_") and k.upper() not in _SCRUB}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def bastion_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bastion", *args]


@dataclass
class BastionServer:
    proc: subprocess.Popen[bytes]
    proxy_port: int
    admin_port: int
    home: Path
    stdout_path: Path
    stderr_path: Path

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ca_cert(self) -> Path:
        return self.home / "mitmproxy-ca-cert.pem"

    def proxy_url(self, agent: str | None = None, token: str | None = None) -> str:
        if agent is None:
            return f"http://127.0.0.1:{self.proxy_port}"
        return f"http://{quote(agent, safe='')}:{quote(token or '', safe='')}@127.0.0.1:{self.proxy_port}"

    def session(self, agent: str | None = None, token: str | None = None) -> requests.Session:
        """A requests session that goes through this Bastion as `agent` (none: no credentials) and trusts its
        CA; the environment's proxy variables are ignored."""
        s = requests.Session()
        s.trust_env = False
        url = self.proxy_url(agent, token)
        s.proxies = {"http": url, "https": url}
        s.verify = str(self.ca_cert)
        return s

    def logs(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            text = self.logs()
            m = rx.search(text)
            if m:
                return m.group(0)
            time.sleep(0.05)
        raise AssertionError(f"log line {pattern!r} did not appear; logs:\n{self.logs()[-4000:]}")

    def admin_get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.admin_url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        return _fetch(req)

    def admin_post(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.admin_url + path, data=b"", method="POST")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        return _fetch(req)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"bastion did not stop within {timeout}s; logs:\n{self.logs()[-4000:]}") from None
        return self.proc.returncode


def _fetch(req: urllib.request.Request) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextmanager
def run_bastion(
    workdir: Path,
    rules: Sequence[Path],
    *,
    home: Path,
    upstream_ca: Path | None = None,
    agent: str | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[BastionServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--home", str(home)]
    for r in rules:
        args += ["--rules", str(r)]
    if upstream_ca is not None:
        args += ["--upstream-ca", str(upstream_ca)]
    if agent is not None:
        args += ["--agent", agent]
    args += list(extra_args)
    stdout_path, stderr_path = workdir / "stdout.log", workdir / "stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(bastion_cmd(*args), cwd=REPO, env=clean_env(env), stdout=out, stderr=err)
    server = None
    try:
        deadline = time.monotonic() + ready_timeout
        match = None
        while match is None:
            if proc.poll() is not None:
                raise AssertionError(f"bastion exited with {proc.returncode}:\n"
                                     + stdout_path.read_text() + stderr_path.read_text())
            if time.monotonic() > deadline:
                raise AssertionError("bastion did not print its startup line:\n" + stderr_path.read_text())
            match = STARTUP_LINE.search(stdout_path.read_text(errors="replace"))
            if match is None:
                time.sleep(0.05)
        server = BastionServer(proc, int(match["proxy"].rsplit(":", 1)[1]), int(match["admin"].rsplit(":", 1)[1]),
                               home, stdout_path, stderr_path)
        while server.admin_get("/readyz")[0] != 200:
            if time.monotonic() > deadline:
                raise AssertionError("bastion never became ready:\n" + server.logs())
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0,
            input_data: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m bastion ARGS...` to completion (for exit codes and messages)."""
    return subprocess.run(bastion_cmd(*args), cwd=REPO, env=clean_env(env), capture_output=True, text=True,
                          timeout=timeout, input=input_data.decode() if input_data else None)
