"""`AuditClient`: the proxy's side of the audit worker process (`bastion.audit.worker`).

The proxy's capture stages call `submit_exchange(snapshot)` once per exchange. That pickles the snapshot into a
frame and queues it; at most `SEND_EVERY` later the queued frames go to the worker's stdin in one write (the
pipe transport buffers whatever the pipe does not take at once, so nothing here ever blocks). The worker
builds, redacts, chains, spools and stores the record on its own core; waking it once per batch rather than
once per exchange saves part of its cost per record.

What the proxy asks synchronously is answered from the worker's last STATUS (sent within
`worker.STATUS_EVERY` of any change) and from what is still on its way:

- `backlog`: exchanges sent but not yet taken by the worker, plus the worker's own backlog (taken, not yet in
  the sink); it is the `bastion_audit_backlog` gauge.
- `available` / `must_refuse()`: False while the worker cannot take records (its spool failed or is full),
  is not running, has fallen `MAX_PENDING_BYTES` behind, or the client is closing; with
  `audit.on_failure: deny` the proxy then answers 503 `audit_unavailable`.
- the worker's counters (`bastion_audit_records_total`, `..._write_errors_total`, `..._dropped_total`) are
  added to this process's metrics as they grow.

Durability: a call's answer is not released to the agent before its record is *handed over*, i.e. in the
pipe to the worker (`handed_over()`, which the capture stage awaits): once there, it lives in the kernel, and a
proxy killed with SIGKILL cannot take it along; the worker, which outlives its proxy, spools everything it
received before it exits (see `bastion.audit.worker`). Exchanges submitted in the same turn of the event loop
share one write, so this costs one pipe write per loop turn, not one per call. If the worker dies, what it
had not yet taken is counted as dropped (`writer_down`), and a new worker is started with a growing delay;
it recovers the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bastion import metrics
from bastion.audit import ipc
from bastion.audit.bodies import BodyCapture
from bastion.audit.drops import Drops
from bastion.audit.ipc import Hello, Ready, Status
from bastion.audit.settings import AuditConfig
from bastion.audit.snapshot import ExchangeSnapshot
from bastion.audit.tracing import TracingSettings

log = logging.getLogger("bastion.audit")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

START_TIMEOUT = 60.0
"""Seconds a new worker gets to open its spool (it may wait for a slot) and answer READY."""
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before restarting a worker that died, growing with each failure in a row."""
SEND_EVERY = 0.05
"""Seconds an exchange may wait in the proxy before it is written to the worker (with the others queued)."""
SEND_NOW_BYTES = 256 << 10
"""Queued bytes that are written at once."""
PIPE_BYTES = 1 << 20
"""Size asked for the pipe to the worker (Linux's default limit for unprivileged processes)."""
HANDOVER_TIMEOUT = 10.0
"""Seconds an answer waits for its record to fit into a full pipe (a stalled worker) before it is released
anyway: the record stays queued, and the `overloaded` limit refuses new calls long before memory runs out."""
MAX_PENDING_BYTES = 256 << 20
"""Bytes of frames the worker has not read (beyond the pipe) at which the client stops taking exchanges
(`overloaded`): with `audit.on_failure: deny` the proxy then refuses calls until the worker catches up."""


class AuditStartError(Exception):
    """The audit log cannot start; `code` is the exit status `bastion serve` should use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Incarnation:
    """One worker process and what the client knows of it."""

    def __init__(self, proc: asyncio.subprocess.Process, output: ipc.PolledPipe) -> None:
        self.proc = proc
        self.output = output  # the worker's frames
        self.ready: Ready | None = None
        self.started = time.monotonic()
        self.sent = 0
        self.status = Status(0, 0, None, 0.0, 0.0, ())
        self.reader: asyncio.Task[None] | None = None  # reads the worker's frames until it exits
        self.closed_ok = False  # the worker answered CLOSED: everything reached the sink

    @property
    def pending(self) -> int:
        """Exchanges sent that the worker has not said it took."""
        return self.sent - self.status.received


class AuditClient:
    """Create with `AuditClient.spawn(...)` (starts the process), then `await start(config)`."""

    def __init__(self, audit_url: str, home: Path, display_url: str, *,
                 max_pending_bytes: int = MAX_PENDING_BYTES, store_url: str | None = None,
                 tracing: TracingSettings | None = None) -> None:
        self._url = audit_url
        self._store_url = store_url
        self._tracing = tracing
        self._home = home
        self.display_url = display_url
        self._max_pending = max_pending_bytes
        self._config = AuditConfig()
        self._loop = asyncio.get_running_loop()
        self._worker: _Incarnation | None = None
        self._frames: list[bytes] = []
        self._queued = 0  # bytes in `_frames`
        self._send_at: asyncio.TimerHandle | None = None
        self._send_soon = False
        self._closing = False
        self._closed: asyncio.Future[bool] | None = None
        self._flushes: dict[int, asyncio.Future[bool]] = {}
        self._handover: asyncio.Future[None] | None = None  # done when what is queued now is in the pipe
        self._draining: set[asyncio.Task[None]] = set()
        self._flush_ids = itertools.count(1)
        self._ready: asyncio.Future[Ready] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._drops = Drops()

    # --- starting ---------------------------------------------------------------------------------------------

    @classmethod
    async def spawn(cls, audit_url: str, home: Path, display_url: str, *,
                    max_pending_bytes: int = MAX_PENDING_BYTES, store_url: str | None = None,
                    tracing: TracingSettings | None = None) -> AuditClient:
        """Start the worker process (it imports while the proxy prepares the rest); `start` completes it.
        With `tracing`, the worker also sends one span per record there (`bastion.audit.tracing`)."""
        client = cls(audit_url, home, display_url, max_pending_bytes=max_pending_bytes, store_url=store_url,
                     tracing=tracing)
        client._worker = await client._launch()
        return client

    async def start(self, config: AuditConfig) -> None:
        """Open the writer in the worker with `config`. Raises AuditStartError."""
        self._config = config
        worker = self._worker
        assert worker is not None
        try:
            await self._handshake(worker)
        except AuditStartError:
            await self._reap(worker)
            raise
        ready = worker.ready
        assert ready is not None
        log.info("audit: writer %s, spool %s, sink %s (worker pid %d)", ready.writer_id, ready.spool,
                 ready.display_url, worker.proc.pid)
        self._supervisor = asyncio.create_task(self._supervise(), name="audit-worker-supervisor")

    async def _launch(self) -> _Incarnation:
        # The worker imports the same Bastion as this process, wherever that came from.
        path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        read_fd, write_fd = os.pipe()  # the worker's output, read by polling (see `bastion.audit.ipc`)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bastion.audit.worker",
                stdin=asyncio.subprocess.PIPE, stdout=write_fd, stderr=None,
                start_new_session=True,  # a terminal's signals go to the proxy, which stops the worker in order
                env={**os.environ, "PYTHONPATH": path})
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        if proc.stdin is not None:  # room for what arrives between two looks of the worker (`ipc.PolledPipe`)
            with contextlib.suppress(OSError, AttributeError):
                fd = proc.stdin.transport.get_extra_info("pipe").fileno()
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            # `drain()` then returns only once the transport holds nothing: every byte is in the pipe.
            proc.stdin.transport.set_write_buffer_limits(high=0, low=0)
        return _Incarnation(proc, ipc.PolledPipe(read_fd))

    async def _handshake(self, worker: _Incarnation) -> None:
        ready = self._ready = self._loop.create_future()
        worker.reader = asyncio.create_task(self._read(worker), name="audit-worker-reader")
        self._write_now(worker, ipc.frame(ipc.HELLO, self._hello()))
        # The reader ends when the worker closes its output: it exited, after a FAILED frame or without one.
        await asyncio.wait({ready, worker.reader}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            worker.ready = ready.result()  # raises the AuditStartError of a FAILED frame
            return
        ready.cancel()
        if worker.reader.done():
            code = await worker.proc.wait()
            raise AuditStartError(f"the audit worker exited ({code}) before it was ready; see the log above", 1)
        raise AuditStartError(f"the audit worker did not open its spool within {START_TIMEOUT:g}s", 1)

    def _hello(self) -> Hello:
        tracing = self._tracing
        if tracing is None:
            return Hello(self._url, str(self._home), self._config, store_url=self._store_url)
        return Hello(self._url, str(self._home), self._config, store_url=self._store_url,
                     otlp_url=tracing.endpoint, service_name=tracing.service_name)

    # --- the proxy's API ----------------------------------------------------------------------------------------

    @property
    def config(self) -> AuditConfig:
        return self._config

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None before it was started)."""
        return self._worker.proc.pid if self._worker is not None else None

    def configure(self, config: AuditConfig) -> None:
        """Apply new settings (after a policy reload) to exchanges submitted from now on."""
        self._config = config
        if self._running() is not None:
            self._queue(ipc.frame(ipc.CONFIGURE, config), now=True)

    def capture(self, *, content_encoding: str = "", content_type: str = "") -> BodyCapture:
        """A `BodyCapture` with the configured `max_body_bytes` cap (for streamed bodies)."""
        return BodyCapture(self._config.max_body_bytes, content_encoding=content_encoding,
                           content_type=content_type)

    def refusal(self) -> str | None:
        """Why an exchange would not be recorded now (the `bastion_audit_dropped_total` reason), or None."""
        if self._closing:
            return "closed"
        worker = self._running()
        if worker is None:
            return "writer_down"
        if self._waiting_bytes(worker) > self._max_pending:
            return "overloaded"  # the worker fell behind: refuse (deny) rather than lose what it has not read
        return worker.status.refusal

    @property
    def available(self) -> bool:
        return self.refusal() is None

    def must_refuse(self) -> bool:
        """Call before forwarding a request: True when records cannot be taken and `on_failure` is deny."""
        return self._config.on_failure == "deny" and not self.available

    @property
    def backlog(self) -> int:
        worker = self._worker
        return 0 if worker is None else worker.pending + worker.status.backlog

    def submit_exchange(self, snapshot: ExchangeSnapshot) -> bool:
        """Send one finished exchange to the worker. Never blocks. False (counted) when it cannot be taken."""
        reason = self.refusal()
        worker = self._worker
        if reason is not None or worker is None:
            self._drops.count(reason or "writer_down", snapshot.id)
            return False
        self._queue(ipc.frame(ipc.EXCHANGE, snapshot.to_wire()))
        worker.sent += 1
        metrics.AUDIT_BACKLOG.inc()
        return True

    def handed_over(self) -> asyncio.Future[None] | None:
        """A future done once every exchange submitted so far is in the pipe to the worker (or could not be
        written because the worker is gone); None when there is nothing to wait for. Awaited before an answer
        is released, so a call the agent saw answered is on record even if this process is killed next."""
        worker = self._running()
        if worker is None or (not self._frames and not self._draining):
            return None
        fut = self._handover
        if fut is None:
            fut = self._handover = self._loop.create_future()
        if not self._send_soon:  # this turn's exchanges go out together, at its end
            if self._send_at is not None:
                self._send_at.cancel()
                self._send_at = None
            self._send_soon = True
            self._loop.call_soon(self._send)
        return fut

    async def flush(self) -> bool:
        """Wait until every exchange submitted before this call is in the sink; False when the worker cannot
        make progress any more. While the sink is down this waits: bound it with `asyncio.timeout`."""
        if self._running() is None:
            return False
        flush_id = next(self._flush_ids)
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._flushes[flush_id] = fut
        self._queue(ipc.frame(ipc.FLUSH, flush_id), now=True)
        try:
            return await fut
        finally:
            self._flushes.pop(flush_id, None)

    async def close(self, *, drain_for: float = 10.0) -> bool:
        """Stop taking exchanges, give the worker `drain_for` seconds to bring the rest to the sink, and wait
        for it to exit. Whatever it could not drain stays in its spool for the next start."""
        if self._closing:
            return await self._closed if self._closed is not None else False
        self._closing = True
        self._closed = self._loop.create_future()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        worker = self._worker
        drained = worker is None or worker.ready is None  # never started: nothing was taken
        if worker is not None and worker.ready is not None and worker.proc.returncode is None:
            self._queue(ipc.frame(ipc.CLOSE, drain_for))
            self._send()
            with contextlib.suppress(ConnectionError, RuntimeError):
                if worker.proc.stdin is not None:
                    worker.proc.stdin.close()
            try:
                async with asyncio.timeout(drain_for + 30.0):
                    await worker.proc.wait()
            except TimeoutError:
                log.error("audit worker %d did not stop; killing it (its spool keeps what it had)", worker.proc.pid)
        if worker is not None:
            await self._reap(worker)  # also reads the worker's last frames, CLOSED among them
            drained = drained or worker.closed_ok
        self._fail_flushes()
        self._closed.set_result(drained)
        return drained

    # --- internals ------------------------------------------------------------------------------------------------

    def _running(self) -> _Incarnation | None:
        worker = self._worker
        if worker is None or worker.ready is None or worker.proc.returncode is not None:
            return None
        return worker

    def _waiting_bytes(self, worker: _Incarnation) -> int:
        """Frames queued here or in the pipe transport's buffer: what the worker has not read yet, beyond what
        the pipe itself holds."""
        stdin = worker.proc.stdin
        return self._queued + (stdin.transport.get_write_buffer_size() if stdin is not None else 0)

    def _queue(self, data: bytes, *, now: bool = False) -> None:
        """Queue a frame; it goes out with the others within `SEND_EVERY` (at once when `now` or when much
        is waiting). Fewer, larger writes wake the worker less often, which is most of its cost at low rates."""
        self._frames.append(data)
        self._queued += len(data)
        if now or self._queued >= SEND_NOW_BYTES:
            if self._send_at is not None:
                self._send_at.cancel()
            self._send_at = None
            if not self._send_soon:
                self._send_soon = True
                self._loop.call_soon(self._send)
        elif self._send_at is None and not self._send_soon:
            self._send_at = self._loop.call_later(SEND_EVERY, self._send)

    def _send(self) -> None:
        """Everything queued so far, in one write."""
        if self._send_at is not None:
            self._send_at.cancel()
        self._send_at, self._send_soon = None, False
        frames, self._frames, self._queued = self._frames, [], 0
        handover, self._handover = self._handover, None
        worker = self._worker
        if worker is None or worker.proc.stdin is None or worker.proc.returncode is not None:
            _resolve(handover)
            return
        if frames:
            self._write_now(worker, b"".join(frames))
        stdin = worker.proc.stdin
        if handover is None:
            return
        if self._draining or stdin.transport.get_write_buffer_size():  # the pipe is full: wait for room
            task = self._loop.create_task(self._drained(stdin, handover, list(self._draining)))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        else:
            _resolve(handover)

    async def _drained(self, stdin: asyncio.StreamWriter, handover: asyncio.Future[None] | None,
                       earlier: list[asyncio.Task[None]]) -> None:
        """Resolve `handover` once the transport's buffer is in the pipe (or `HANDOVER_TIMEOUT` passed)."""
        try:
            async with asyncio.timeout(HANDOVER_TIMEOUT):
                for task in earlier:
                    await asyncio.shield(task)
                await stdin.drain()
        except TimeoutError:
            log.warning("audit: the worker has not read its input for %gs; releasing answers whose records "
                        "are still queued", HANDOVER_TIMEOUT)
        except (ConnectionError, RuntimeError):
            pass  # the worker is gone: the supervisor counts what it never took
        finally:
            _resolve(handover)

    @staticmethod
    def _write_now(worker: _Incarnation, data: bytes) -> None:
        stdin = worker.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):  # the worker is gone: the supervisor sees it
            stdin.write(data)

    async def _read(self, worker: _Incarnation) -> None:
        """The worker's frames, looked at every `ipc.POLL_EVERY`, until it exits."""
        try:
            while True:
                frames, ended = worker.output.read_available()
                for kind, value in frames:
                    self._on_frame(worker, kind, value)
                if ended:
                    return
                await asyncio.sleep(ipc.POLL_EVERY)
        except ipc.ProtocolError as e:
            log.error("audit worker %d: %s", worker.proc.pid, e)
        finally:
            worker.output.close()

    def _on_frame(self, worker: _Incarnation, kind: bytes, value: Any) -> None:
        if kind == ipc.STATUS:
            self._on_status(worker, value)
        elif kind == ipc.FLUSHED:
            flush_id, ok = value
            fut = self._flushes.pop(flush_id, None)
            if fut is not None and not fut.done():
                fut.set_result(bool(ok))
        elif kind == ipc.READY and self._ready is not None and not self._ready.done():
            self._ready.set_result(value)
        elif kind == ipc.FAILED and self._ready is not None and not self._ready.done():
            message, code = value
            self._ready.set_exception(AuditStartError(message, code))
        elif kind == ipc.CLOSED:
            worker.closed_ok = bool(value)

    def _on_status(self, worker: _Incarnation, status: Status) -> None:
        before = worker.status
        worker.status = status
        _grow(metrics.AUDIT_RECORDS, status.records - before.records)
        _grow(metrics.AUDIT_WRITE_ERRORS, status.write_errors - before.write_errors)
        previous = dict(before.dropped)
        for reason, value in status.dropped:
            _grow(metrics.AUDIT_DROPPED.labels(reason=reason), value - previous.get(reason, 0.0))
        metrics.AUDIT_BACKLOG.set(self.backlog)

    async def _supervise(self) -> None:
        """Restart the worker when it dies; what it had not taken is lost and counted."""
        failures = 0
        while True:
            worker = self._worker
            assert worker is not None
            code = await worker.proc.wait()
            if self._closing:
                return
            lost = worker.pending
            if lost:
                metrics.AUDIT_DROPPED.labels(reason="writer_down").inc(lost)
            log.error("audit worker %d exited (%s); %d record(s) it had not yet taken are lost; restarting it",
                      worker.proc.pid, code, lost)
            await self._reap(worker)
            self._fail_flushes()
            if time.monotonic() - worker.started > 60.0:
                failures = 0
            while not self._closing:
                await asyncio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])
                failures += 1
                self._worker = fresh = await self._launch()
                try:
                    await self._handshake(fresh)
                except AuditStartError as e:
                    log.error("audit worker could not start again: %s", e)
                    await self._reap(fresh)
                    continue
                metrics.AUDIT_BACKLOG.set(self.backlog)
                log.warning("audit worker %d is back (writer %s); records are taken again", fresh.proc.pid,
                            fresh.ready.writer_id if fresh.ready else "?")
                break

    async def _reap(self, worker: _Incarnation) -> None:
        if worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            await worker.proc.wait()
        if worker.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.reader  # reads to the end, then closes the worker's output
        else:
            worker.output.close()
        if worker.proc.stdin is not None:
            worker.proc.stdin.close()

    def _fail_flushes(self) -> None:
        for fut in self._flushes.values():
            if not fut.done():
                fut.set_result(False)
        self._flushes.clear()


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def _grow(counter: Any, delta: float) -> None:
    if delta > 0:
        counter.inc(delta)
