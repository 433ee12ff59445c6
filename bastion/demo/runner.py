"""Run the demo: fake upstreams, a real `bastion serve` with the demo policy, the agents' story, and a clean
shutdown on Ctrl-C, SIGTERM or after `--duration`.

`bastion serve` runs as a subprocess, exactly as a user would start it (its own audit worker included), on free
ports of 127.0.0.1 read from its startup line. It gets its own session, so Ctrl-C reaches the demo alone: the
demo stops the agents first and then the server, which drains the audit log, and no call is cut mid-way.
Its environment drops every `BASTION_*` and proxy variable, so a demo never touches a real store or audit sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bastion.demo.scenario import ADMIN_TOKEN, ADMIN_USER, Narrator, play, print_line
from bastion.demo.upstreams import Upstreams, running_upstreams

# rules/examples/demo.yaml, through a symlink in the package: a checkout reads the example itself, and a built
# wheel (the container image's install) carries a copy of it as package data.
POLICY = Path(__file__).with_name("policy.yaml")
STARTUP_LINE = re.compile(r"proxy on (?P<proxy>http://\S+), admin on (?P<admin>http://[^\s]+)")
SERVER_LOG = "demo-serve.log"
READY_TIMEOUT = 60.0  # the first start makes the CA and the databases: a few seconds on a slow machine
STOP_TIMEOUT = 20.0  # `bastion serve` lets calls finish (10 s) and drains the audit log before it exits
_SCRUB = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
          "CURL_CA_BUNDLE"}


class DemoError(Exception):
    """The demo could not start (the policy is missing, the server did not come up); the message says why."""


@dataclass
class Server:
    process: asyncio.subprocess.Process
    proxy: str
    admin: str
    log: Path


def server_env() -> dict[str, str]:
    """The environment of `bastion serve`: ours without BASTION_* and proxy variables, so `--home` alone
    decides where the store, the audit log and the CA are."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k.upper() not in _SCRUB}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_server(home: Path) -> Server:
    """Start `bastion serve` on free ports with the demo policy; return once `/readyz` answers 200."""
    log = home / SERVER_LOG
    out = await asyncio.to_thread(log.open, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bastion", "serve", "--rules", str(POLICY), "--home", str(home),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=server_env(), start_new_session=True)
    finally:
        await asyncio.to_thread(out.close)
    try:
        match = await _wait_for_startup(process, log)
        server = Server(process, match["proxy"], match["admin"], log)
        await _wait_ready(server)
    except BaseException:
        await stop_server(process)
        raise
    return server


async def _wait_for_startup(process: asyncio.subprocess.Process, log: Path) -> re.Match[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while True:
        text = await asyncio.to_thread(log.read_text, errors="replace")
        match = STARTUP_LINE.search(text)
        if match:
            return match
        if process.returncode is not None:
            raise DemoError(f"bastion serve exited with {process.returncode}:\n{text[-3000:]}")
        if loop.time() > deadline:
            raise DemoError(f"bastion serve did not start within {READY_TIMEOUT:.0f}s; see {log}")
        await asyncio.sleep(0.1)


async def _wait_ready(server: Server) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.admin + "/readyz") as resp:
                    if resp.status == 200:
                        return
            if loop.time() > deadline:
                raise DemoError(f"bastion serve never became ready; see {server.log}")
            await asyncio.sleep(0.1)


async def stop_server(process: asyncio.subprocess.Process) -> None:
    """SIGTERM (calls finish, the audit log drains), and SIGKILL only if it hangs."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def banner(server: Server, up: Upstreams, home: Path, auto_approve: bool) -> None:
    print_line("Bastion demo: a support desk of four agents, on 127.0.0.1 only, policy " + str(POLICY.resolve()))
    print_line(f"  proxy:     {server.proxy}")
    print_line(f"  dashboard: {server.admin}/ (log in with the token {ADMIN_TOKEN})")
    print_line(f"             user {ADMIN_USER} (admin, approver); approvals at {server.admin}/approvals")
    print_line(f"  upstreams: tickets {up.tickets}, LLM {up.llm}, payments {up.payments}, MCP {up.mcp}")
    print_line(f"  home:      {home} (store, audit log, CA; the server's log is {SERVER_LOG})")
    if auto_approve:
        print_line("  approvals: pat approves held calls through the admin API (--auto-approve)")
    else:
        print_line("  approvals: yours to give: the large refund waits until you approve it on the dashboard")
    print_line("Ctrl-C stops everything.")
    print_line()


async def run_demo(home: Path, duration: float | None, auto_approve: bool) -> int:
    """The whole demo; returns the exit status: 0 after `duration` or SIGTERM, 130 after Ctrl-C (as every
    command), 1 when it cannot start."""
    if not POLICY.is_file():
        raise DemoError(f"the demo policy {POLICY} is missing: this installation of Bastion is incomplete "
                        "(reinstall it, or run the demo from a checkout)")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with running_upstreams() as up:
            server = await _until_stopped(start_server(home), stop)
            if server is None:
                return _status(stopped_by)
            try:
                banner(server, up, home, auto_approve)
                await _until_stopped(play(server.proxy, server.admin, up, auto_approve=auto_approve,
                                          narrator=Narrator()), stop, duration)
                print_line()
                print_line("stopping: agents, then bastion serve (it drains the audit log), then the upstreams")
            finally:
                await stop_server(server.process)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    print_line(f"done. Everything stays in {home}: try")
    print_line(f"  bastion audit tail --home {home}")
    print_line(f"  bastion audit verify --home {home}")
    return _status(stopped_by)


async def _until_stopped[T](work: Coroutine[Any, Any, T], stop: asyncio.Event,
                            seconds: float | None = None) -> T | None:
    """Run `work` until it ends, `stop` is set or `seconds` pass; cancel it in the last two cases (None)."""
    task = asyncio.create_task(work)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    return task.result() if not task.cancelled() else None


def _status(stopped_by: list[signal.Signals]) -> int:
    return 130 if signal.SIGINT in stopped_by else 0


def demo_home(given: str | None) -> Path:
    """`--home`, created if missing, or a fresh temporary directory: the demo never writes into ~/.bastion."""
    if given:
        home = Path(given).expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        return home
    return Path(tempfile.mkdtemp(prefix="bastion-demo-"))
