"""`bastion serve`: one process, one asyncio loop, running an embedded mitmproxy `Master` and the admin app.

Startup, in order (each step refuses to go on when it fails, with a clear message and exit code):

1. load the policy in a worker thread (invalid: `FILE:LINE` errors, exit 3; `--agent` unknown: exit 3);
2. make sure the CA exists in `--home` and write the upstream trust bundle (`--upstream-ca`);
3. learn what agents may never reach (this host's addresses, store/audit services);
4. bind the admin listener, then the proxy listener (address in use: exit 1);
5. print one line with both addresses, start watching the rules, handle SIGHUP (reload) and
   SIGTERM/SIGINT (graceful shutdown: stop accepting, let in-flight calls finish within the grace
   period, then exit 0; a second signal cuts the wait short).

mitmproxy runs with a hand-picked minimal addon list (measured ~1.8x faster than mitmdump's default set)
plus Bastion's pipeline: one addon that runs Bastion's stages (one class per concern) in the order that
requests pass them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bastion.config import ConfigError
from bastion.coord.store import LockStore
from bastion.policy.engine import Policy
from bastion.policy.load import PolicyIssue, PolicyLoadError
from bastion.proxy.ca import ensure_ca, write_client_bundle, write_upstream_trust
from bastion.proxy.longlived import settle
from bastion.proxy.netcheck import ProtectedTargets, local_addresses, normalize, parse_ip
from bastion.proxy.reload import RulesWatcher, cancel_and_wait
from bastion.proxy.settings import ServeSettings
from bastion.proxy.state import PolicyState

log = logging.getLogger("bastion")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INVALID_POLICY = 0, 1, 2, 3


class StartupError(Exception):
    """Startup cannot continue; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def pinned_agent_validator(agent: str | None) -> Any:
    """A policy without the pinned agent would leave the sidecar with nobody to serve: refuse it."""
    if agent is None:
        return None

    def validate(policy: Policy) -> list[PolicyIssue]:
        if agent in policy.agents:
            return []
        where = policy.sources[0] if policy.sources else "<rules>"
        return [PolicyIssue(where, None, f"agent {agent!r} (--agent / BASTION_AGENT) is not defined under "
                                         "`agents` in the rules", "agent_not_in_policy")]

    return validate


class Lifecycle:
    """mitmproxy addon: tells the server when the proxy listeners are up (the `running` hook)."""

    def __init__(self) -> None:
        self.running_event = asyncio.Event()

    def running(self) -> None:
        self.running_event.set()


@dataclass
class Proxy:
    master: Any
    flights: Any  # the `Flights` stage: what is in flight, for a graceful shutdown
    guard: Any
    lifecycle: Lifecycle
    header_timeout: Any


@dataclass
class Fleet:
    """The fleet stages' shared parts: the store (milestones, budgets, pauses, guard counts) and this sidecar's
    view of the pauses."""

    store: Any
    watch: Any
    milestones: Any = None  # the Milestones stage, once built (a milestone cleared here is forgotten at once)


_EMPTY_POLICY_HINT = """\
bastion: this policy lets nothing through yet (no agents or no rules): every call will be refused.
  To see everything working first:  bastion demo
  To let an agent in: `bastion token NAME` prints a token and its YAML line; add the agent and an allow rule
  to the rules file (it reloads by itself), then point the agent at http://NAME:TOKEN@<proxy address>.
  The README's five-minute tour walks through it with rules/examples/tour.yaml."""


def build_proxy(settings: ServeSettings, state: PolicyState, protected: ProtectedTargets,
                upstream_trust: Path | None, lock_store: LockStore | None = None, capture: Any = None,
                holds: Any = None, fleet: Fleet | None = None) -> Proxy:
    """The embedded mitmproxy Master with its addons (must be called inside the running loop). `capture` is the
    audit's `bastion.proxy.capture.Capture`; `holds` the `bastion.proxy.approvals.HoldForApproval` stage;
    `fleet` the pause watch and store of the fleet stages (pauses, milestones, budgets, guards)."""
    from mitmproxy import options
    from mitmproxy.addons import next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    from bastion.proxy import httplimits
    from bastion.proxy.agent_guards import Guards
    from bastion.proxy.alpn import PreferHttp2
    from bastion.proxy.budgets import Budgets, BudgetSettle
    from bastion.proxy.enforce import Enforce
    from bastion.proxy.flights import Flights
    from bastion.proxy.gate import Gate
    from bastion.proxy.guard import InboundGuard, NetworkGuard
    from bastion.proxy.identity import Identity
    from bastion.proxy.locks import TaskLocks
    from bastion.proxy.memory import ReleaseBodies
    from bastion.proxy.milestones import Milestones
    from bastion.proxy.pauses import PauseCheck
    from bastion.proxy.pipeline import Pipeline
    from bastion.proxy.streaming import ResponseStreaming
    from bastion.proxy.timeouts import HeaderTimeout
    from bastion.proxy.traffic import Traffic
    from bastion.proxy.wsession import WebSocketSessions

    httplimits.install()  # early answers, body and head limits while reading, JSON 502

    host, port = settings.listen
    opts = options.Options(
        listen_host=host,
        listen_port=port,
        mode=["regular"],
        confdir=str(settings.data.home.path),
        rawtcp=False,  # only HTTP goes through: never a raw TCP tunnel past the rules
        http3=False,
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=str(upstream_trust) if upstream_trust else None,
    )
    master = Master(opts)
    lifecycle = Lifecycle()
    guard = NetworkGuard(protected)
    flights = Flights()
    server = proxyserver.Proxyserver()
    header_timeout = HeaderTimeout(server, settings.header_timeout)
    if fleet is not None:
        fleet.milestones = Milestones(fleet.store)  # kept: a milestone cleared here is forgotten at once
    # The order requests pass the stages, top to bottom (None: a stage whose service is not wired in).
    stages = [s for s in (
        lifecycle,
        InboundGuard(),
        header_timeout,
        PreferHttp2(),
        # audit intake before identity: what the agent sent, before any stage changes it
        capture.intake if capture is not None else None,
        Identity(state, settings.agent),
        Enforce(max_request_body=settings.max_request_body, max_header_bytes=settings.max_header_bytes),
        # a paused agent is stopped before anything else is asked on its behalf
        PauseCheck(fleet.watch) if fleet is not None else None,
        guard,
        # Stages that meet obligations, before the gate refuses what is unmet. Milestones before approvals (no
        # person is asked about a call that cannot go yet); approvals before locks and budgets (a lock is taken
        # only for a call no person still has to decide on); then a call that waited for a person while its
        # agent was paused is refused; then its budgets are reserved and its task locks taken.
        fleet.milestones if fleet is not None else None,
        holds,
        PauseCheck(fleet.watch, recheck=True) if fleet is not None else None,
        Budgets(fleet.store) if fleet is not None else None,
        TaskLocks(lock_store) if lock_store is not None else None,
        Gate(),
        # Stages that follow the call without refusing it: whether its answer is streamed, then in-flight
        # counting and request metrics (the outcome is final by now), then websocket sessions.
        ResponseStreaming(),
        flights,
        WebSocketSessions(server, max_text_bytes=capture and (lambda: capture.writer.config.max_body_bytes)),
        # Observers, so they see the final outcome of every request: what the traffic meant (LLM and MCP
        # facts); after it what the answer cost against budgets and the agent guards (it knows the tokens an
        # answer used); then the audit capture (which records all of that too).
        Traffic(response_facts=settings.response_facts),
        BudgetSettle(fleet.store) if fleet is not None else None,
        Guards(fleet.store, fleet.watch) if fleet is not None else None,
        capture,
        ReleaseBodies(),  # after the record is taken: the request body is not read again
    ) if s is not None]
    # mitmproxy's own addons: only those the proxy needs. Every addon in the chain costs CPU on every event
    # of every request, so Core (interactive commands), Block (replaced by InboundGuard) and DisableH2C
    # (handled by Enforce) are left out.
    master.addons.add(
        server,
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),  # before the pipeline: PreferHttp2 adjusts the TLS setup TlsConfig prepares
        Pipeline(stages),
    )
    # Options owned by addons exist only once the addons are loaded.
    master.options.update(
        connection_strategy="lazy",  # no upstream connection for refused requests
        tcp_timeout=max(1, round(settings.idle_timeout)),  # mitmproxy's inactivity timeout (per connection)
    )
    return Proxy(master, flights, guard, lifecycle, header_timeout)


async def protected_targets(settings: ServeSettings) -> ProtectedTargets:
    """The store/audit services and this host's addresses, resolved off the loop."""
    targets = ProtectedTargets()
    targets.local_ips.update(normalize(ip) for ip in await asyncio.to_thread(local_addresses))
    loop = asyncio.get_running_loop()
    for host, port in settings.protected:
        addresses = []
        ip = parse_ip(host)
        if ip is not None:
            addresses.append(ip)
        else:
            try:
                infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 5.0)
                addresses.extend(a for a in (parse_ip(str(i[4][0])) for i in infos) if a is not None)
            except (OSError, TimeoutError, UnicodeError) as e:
                log.warning("cannot resolve the store/audit host %s (%s); it stays blocked by name", host, e)
        targets.add_service(host, port, f"Bastion's store/audit service ({host}:{port})", addresses)
    return targets


def _listen_error(what: str, addr: tuple[str, int], exc: BaseException) -> StartupError:
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    reason = getattr(cause, "strerror", None) or str(cause)
    return StartupError(f"cannot listen on {_fmt(addr)} ({what}): {reason}")


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _DropListenErrors(logging.Filter):
    """mitmproxy logs its own bind failure with mitmproxy-specific advice; Bastion reports it itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to listen" not in record.getMessage()


async def serve(settings: ServeSettings, *, audit: bool = True) -> int:
    """Run until SIGTERM/SIGINT. `audit=False` leaves the audit capture out: only for benchmarks measuring
    what capture costs (bench/audit_proxy_bench.py); no flag or variable exposes it."""
    from bastion.coord import open_approval_store, open_fleet_store, open_store
    from bastion.proxy.auditing import AuditService
    from bastion.proxy.memory import tune_allocator

    tune_allocator()  # freed bodies go back to the system instead of staying in RSS
    try:
        store = open_store(settings.data.store)  # no I/O yet; closed after the last in-flight call
        approvals = open_approval_store(settings.data.store)
        fleet_store = open_fleet_store(settings.data.store)
    except ConfigError as e:
        print(f"bastion serve: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    # Opened once the policy is loaded; drained and closed after the last in-flight call.
    audit_service = (AuditService(settings.data, pinned=settings.agent, tracing=settings.tracing)
                     if audit else None)
    try:
        return await _serve(settings, store, approvals, fleet_store, audit_service)
    except StartupError as e:
        print(f"bastion serve: {e}", file=sys.stderr, flush=True)
        return e.code
    finally:
        if audit_service is not None:
            await audit_service.close()
        await approvals.close()
        await fleet_store.close()
        await store.close()


async def _serve(settings: ServeSettings, store: LockStore, approvals: Any, fleet_store: Any,
                 audit: Any = None) -> int:
    from bastion.coord.notify import ApprovalNotifier
    from bastion.coord.store import StoreUnavailable
    from bastion.dashboard.app import create_app
    from bastion.proxy.approvals import HoldForApproval, keep_pending_gauge
    from bastion.proxy.locks import STARTUP_PING_TIMEOUT, check_store, keep_locks_gauge
    from bastion.proxy.pauses import PauseWatch

    loop = asyncio.get_running_loop()
    if audit is not None:  # a `bastion.proxy.auditing.AuditService`: its worker process starts while we go on
        from bastion.proxy.auditing import AuditStartError

        try:
            await audit.spawn()
        except AuditStartError as e:
            raise StartupError(str(e), e.code) from None
    try:
        state = await PolicyState.load(settings.rules, pinned_agent_validator(settings.agent))
    except PolicyLoadError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        raise StartupError(f"the policy is invalid ({len(e.issues)} problem(s)); not starting",
                           EXIT_INVALID_POLICY) from None
    home = settings.data.home
    try:
        ca_cert = await asyncio.to_thread(ensure_ca, home)
        # Sidecar deployments hand `<home>/ca-bundle.pem` to the agent's container: keep it current at start.
        await asyncio.to_thread(write_client_bundle, home, ca_cert)
        trust = (await asyncio.to_thread(write_upstream_trust, home, settings.upstream_ca)
                 if settings.upstream_ca else None)
    except ConfigError as e:
        raise StartupError(str(e), EXIT_USAGE) from None
    except OSError as e:
        raise StartupError(f"cannot prepare the CA in {home.path}: {e.strerror or e}") from None
    protected = await protected_targets(settings)
    await check_store(store)
    audit_checks = []
    if audit is not None:
        try:
            await audit.start(state)
        except AuditStartError as e:
            raise StartupError(str(e), e.code) from None
        audit_checks.append(("audit", audit.ready))

    # Admin listener first: its address must be protected before the first agent connects.
    draining = False

    async def proxy_ready() -> tuple[bool, str]:
        if draining:
            return False, "shutting down"
        return proxy_running.is_set(), "listening" if proxy_running.is_set() else "starting"

    proxy_running = asyncio.Event()
    notifier = ApprovalNotifier(lambda: state.policy.approvals if state.policy is not None else None)
    holds = HoldForApproval(approvals, notify=notifier)
    fleet = Fleet(fleet_store, PauseWatch(fleet_store, on_pause=holds.watch.wake_agent))
    with contextlib.suppress(StoreUnavailable, TimeoutError):  # pauses in force apply from the first call
        await asyncio.wait_for(fleet.watch.refresh(), STARTUP_PING_TIMEOUT)
    runner = web.AppRunner(create_app(state, ready_checks=[("proxy", proxy_ready), *audit_checks], lock_store=store,
                                      audit_store=audit.reader if audit is not None else None,
                                      approval_store=approvals, notify=notifier, home=home.path,
                                      fleet_store=fleet_store),
                           access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.admin[0], settings.admin[1]).start()
    except OSError as e:
        await runner.cleanup()
        raise _listen_error("--admin", settings.admin, e) from None
    admin_addr = runner.addresses[0]
    protected.add_local(int(admin_addr[1]), "Bastion's admin listener", settings.admin[0])

    logging.getLogger("mitmproxy.addons.proxyserver").addFilter(_DropListenErrors())
    logging.getLogger("mitmproxy.proxy.mode_servers").addFilter(_DropListenErrors())
    from bastion.dashboard.fleet_api import FLEET_LISTENERS

    runner.app[FLEET_LISTENERS].append(lambda event: _apply_fleet_event(fleet, event))
    proxy = build_proxy(settings, state, protected, trust, store, audit.capture if audit is not None else None,
                        holds, fleet)
    if settings.listen[1] != 0:
        protected.add_local(settings.listen[1], "Bastion's proxy listener", settings.listen[0])
    run_task = asyncio.create_task(proxy.master.run(), name="mitmproxy")
    running = asyncio.create_task(proxy.lifecycle.running_event.wait())
    await asyncio.wait({run_task, running}, return_when=asyncio.FIRST_COMPLETED)
    ps = proxy.master.addons.get("proxyserver")
    failed = next((s.last_exception for s in ps.servers if s.last_exception is not None), None)
    if run_task.done() or failed is not None or not ps.listen_addrs():
        running.cancel()
        await _stop_master(proxy, run_task)
        await runner.cleanup()
        raise _listen_error("--listen", settings.listen, failed or OSError("the proxy did not start"))
    listen_addr = ps.listen_addrs()[0]
    protected.add_local(int(listen_addr[1]), "Bastion's proxy listener", settings.listen[0])
    proxy.guard.forget_verdicts()
    settle()  # what startup built lives as long as the process: later collections skip it
    proxy_running.set()

    policy = state.policy
    pinned = f", every connection is agent {settings.agent!r}" if settings.agent else ""
    print(f"bastion: proxy on http://{_fmt(listen_addr)}, admin on http://{_fmt(admin_addr)} "
          f"(policy {policy.revision[:12]}, {len(policy.rules)} rules{pinned})", flush=True)
    if not policy.rules or not (policy.agents or settings.agent):
        print(_EMPTY_POLICY_HINT, flush=True)

    background: set[asyncio.Task[Any]] = set()
    background.add(asyncio.create_task(keep_locks_gauge(store), name="locks-gauge"))
    background.add(asyncio.create_task(keep_pending_gauge(approvals), name="approvals-gauge"))
    background.add(asyncio.create_task(fleet.watch.run(), name="pause-watch"))

    def reload_soon(trigger: str) -> None:
        task = loop.create_task(state.reload(trigger))
        background.add(task)
        task.add_done_callback(background.discard)

    async def on_change() -> None:
        await state.reload("watch")

    watcher = asyncio.create_task(RulesWatcher(settings.rules, on_change).run(), name="rules-watcher")
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_stop_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, reload_soon, "sighup")
    try:
        await stop.wait()
    finally:
        draining = True
        for sig in (signal.SIGHUP,):
            loop.remove_signal_handler(sig)
        log.info("shutting down: closing the proxy listener, %d call(s) in flight", proxy.flights.inflight)
        await ps.servers.update([])  # stop accepting (master.shutdown() alone leaves the socket open)
        holds.watch.close()  # held calls answer 409 now; their approvals stay in the store for the re-sends
        waiter = asyncio.create_task(proxy.flights.wait_idle())
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({waiter, forced}, timeout=settings.grace, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not waiter.done():
            waiter.cancel()
            log.warning("shutdown: %d call(s) still in flight %s; cutting them", proxy.flights.inflight,
                        "at the second signal" if force.is_set() else f"after the {settings.grace:g}s grace period")
        await cancel_and_wait(watcher)
        for task in list(background):
            await cancel_and_wait(task)
        await _stop_master(proxy, run_task)
        await runner.cleanup()
        await notifier.flush(2.0)
        await notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return EXIT_OK


def _apply_fleet_event(fleet: Fleet, event: dict[str, Any]) -> None:
    """A pause, resume or cleared milestone made through this sidecar's admin API applies here at once (other
    sidecars poll)."""
    from bastion.coord.fleet import Pause

    pause, action = event.get("record"), event.get("action")
    if action == "pause" and isinstance(pause, Pause):
        fleet.watch.add(pause)
    elif action == "resume" and isinstance(event.get("agent"), str):
        fleet.watch.remove(event["agent"])
    elif action == "milestone_clear" and fleet.milestones is not None:
        fleet.milestones.forget(event.get("key"))


async def _stop_master(proxy: Proxy, run_task: asyncio.Task[Any]) -> None:
    await proxy.header_timeout.stop()
    ps = proxy.master.addons.get("proxyserver")
    with contextlib.suppress(Exception):
        await ps.servers.update([])
    proxy.master.shutdown()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(run_task, 5.0)
