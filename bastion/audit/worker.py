"""The audit worker: `bastion serve` runs its `AuditWriter` in this child process (`python -m bastion.audit.worker`).

Why a process: turning an exchange into a stored record (decoding, redaction, compression, canonical JSON,
the hash chain, spool writes, the sink) is CPU work in Python. On a thread it would share the proxy's GIL and
slow every call the proxy is serving; in its own process it runs beside the proxy on another core, and the
proxy's part shrinks to pickling a snapshot onto a pipe (`bastion.audit.client`).

Life:
- The proxy starts the worker early (imports overlap the proxy's own start) and sends HELLO with the audit URL,
  the home directory and the settings. The worker takes the first free spool slot under the home
  (`<home>/spool`, `<home>/spool.1`, ...: one spool belongs to one process), opens the writer and answers
  READY, or FAILED with the message and exit status `bastion serve` should stop with.
- The worker looks at its input every `ipc.POLL_EVERY` instead of waiting on it (see `bastion.audit.ipc`).
  EXCHANGE frames become records (`AuditWriter.submit_exchange`); the worker reports STATUS (records taken,
  backlog, whether records can be taken, metric totals) whenever it changed, at most every `STATUS_EVERY`
  seconds, so the proxy's `/metrics` and `/readyz` tell the truth. It also runs the retention job: it owns
  the sink.
- With an OTLP URL in HELLO, each record the writer spools also becomes a span (`bastion.audit.tracing`); the
  last spans get at most `tracing.CLOSE_TIMEOUT` seconds when the worker exits.
- CLOSE: drain to the sink for the given time, answer CLOSED, exit. End of input without CLOSE means the proxy
  is gone (killed): everything received is spooled and synced, then the worker exits; the next start drains
  it. A worker left running by a killed proxy says so in `<spool>/owner`, and a new worker waits for it to
  finish before taking that slot, so a restarted sidecar keeps its spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bastion import metrics
from bastion.audit import ipc
from bastion.audit.checkpoint import Checkpointer, start_checkpoints
from bastion.audit.ipc import Hello, Ready, Status
from bastion.audit.retention import run_retention
from bastion.audit.sinks import StoreError
from bastion.audit.snapshot import ExchangeSnapshot
from bastion.audit.spool import SPOOL_SLOTS, SpoolLockedError, spool_slot
from bastion.audit.tracing import RecordTracer, TracingSettings, report, start_tracing
from bastion.audit.writer import AuditWriter

log = logging.getLogger("bastion.audit")

STATUS_EVERY = 0.05
"""Seconds between STATUS frames while something changes."""
WORKER_NICE = 5
"""How much lower the worker's CPU priority is than the proxy's (see `run`)."""
ORPHAN_WAIT = 10.0
"""Seconds a new worker waits for a slot whose worker outlived its proxy (it is spooling what it had)."""


class StartError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def open_writer(hello: Hello) -> AuditWriter:
    """The writer on the first free spool slot. Raises StartError."""
    home = Path(hello.home)
    for index in range(SPOOL_SLOTS):
        spool = spool_slot(home, index)
        try:
            writer = await _open_slot(hello, spool)
        except SpoolLockedError:
            continue
        except StoreError as e:
            raise StartError(f"--audit: {e}", 2) from None
        except OSError as e:
            raise StartError(f"cannot open the audit spool in {home}: {e.strerror or e}", 1) from None
        if index:
            log.info("audit spool %s is used by another Bastion process; this one uses %s", spool_slot(home, 0),
                     spool)
        with contextlib.suppress(OSError):
            (spool / "owner").write_text(f"{os.getpid()} {os.getppid()}\n")
        return writer
    raise StartError(f"every audit spool slot in {home} ({SPOOL_SLOTS}) is used by another Bastion process; give "
                     "this one its own --home", 1)


async def _open_slot(hello: Hello, spool: Path) -> AuditWriter:
    """Open `spool`, waiting for it while its holder is a worker whose proxy is gone (it exits shortly)."""
    deadline = time.monotonic() + ORPHAN_WAIT
    waiting = False
    while True:
        try:
            return await AuditWriter.open(hello.audit_url, spool, config=hello.config)
        except SpoolLockedError:
            if not _held_by_orphan(spool) or time.monotonic() >= deadline:
                raise
        if not waiting:
            waiting = True
            log.info("audit spool %s is held by the worker of a proxy that is gone; waiting up to %gs for it to "
                     "spool what it has and exit", spool, ORPHAN_WAIT)
        await asyncio.sleep(0.05)


def _held_by_orphan(spool: Path) -> bool:
    try:
        _pid, parent = (int(x) for x in (spool / "owner").read_text().split())
    except (OSError, ValueError):
        return False
    if parent == os.getppid():
        return False  # our own proxy holds it through another worker: a live sibling, not an orphan
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Worker:
    """One worker process: reads frames from the proxy, answers on `out`."""

    def __init__(self, source: ipc.PolledPipe, out: asyncio.WriteTransport) -> None:
        self._input = source
        self._out = out
        self._writer: AuditWriter | None = None
        self._received = 0
        self._last_status: Status | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checkpoints: Checkpointer | None = None
        self._tracer: RecordTracer | None = None

    def send(self, kind: bytes, value: Any) -> None:
        if not self._out.is_closing():
            self._out.write(ipc.frame(kind, value))

    async def run(self) -> int:
        hello = await self._hello()
        if hello is None:
            return 0  # the proxy stopped before it needed us
        try:
            writer = self._writer = await open_writer(hello)
        except StartError as e:
            self.send(ipc.FAILED, (str(e), e.code))
            return e.code
        self.send(ipc.READY, Ready(writer.writer_id, str(writer.spool_directory), writer.store.display_url))
        self._spawn(self._report(), "audit-status")
        self._spawn(run_retention(writer.store, lambda: writer.config), "audit-retention")
        self._start_tracing(hello, writer)
        self._checkpoints = await start_checkpoints(Path(hello.home), writer, hello.store_url)
        try:
            return await self._serve(writer)
        finally:
            for task in self._tasks:
                task.cancel()
            if self._checkpoints is not None:
                await self._checkpoints.close(within=0.0)  # an error ended the worker: no last checkpoint
            if self._tracer is not None:  # the writer is closed (or broken): no more records to trace
                await asyncio.to_thread(self._tracer.close)

    def _start_tracing(self, hello: Hello, writer: AuditWriter) -> None:
        """Spans for the records from now on, when HELLO names a collector. Never stops the worker."""
        if not hello.otlp_url:
            return
        settings = TracingSettings(hello.otlp_url, hello.service_name)
        try:
            self._tracer = start_tracing(settings, writer_id=writer.writer_id)
        except Exception as e:  # the OpenTelemetry packages are missing or broken: records go on without spans
            report("cannot start (%s); no spans are sent", e or type(e).__name__)
            return
        writer.on_record = self._tracer.observe
        log.info("tracing: one span per record to %s", self._tracer.endpoint)

    async def _serve(self, writer: AuditWriter) -> int:
        while True:
            try:
                batch, ended = self._input.read_available()
            except ipc.ProtocolError as e:
                log.error("audit worker: %s; keeping what was received", e)
                batch, ended = [], True
            for kind, value in batch:
                if kind == ipc.EXCHANGE:
                    self._received += 1
                    writer.submit_exchange(ExchangeSnapshot.from_wire(value))
                elif kind == ipc.CONFIGURE:
                    writer.configure(value)
                elif kind == ipc.FLUSH:
                    self._spawn(self._flush(writer, value), "audit-flush")
                elif kind == ipc.CLOSE:
                    drained = await writer.close(drain_for=float(value))
                    await self._seal()
                    self.send(ipc.STATUS, self._status())
                    self.send(ipc.CLOSED, drained)
                    return 0
            if ended:  # the proxy is gone without saying goodbye: keep everything, the next start drains it
                if self._input.frames.partial:
                    log.error("audit worker: the proxy stopped in the middle of a record; that record is lost")
                await writer.close(drain_for=0.0)
                await self._seal()
                return 0
            await asyncio.sleep(ipc.POLL_EVERY)

    async def _seal(self) -> None:
        """The last signed checkpoint, for what the sink took before the writer closed."""
        if self._checkpoints is not None:
            checkpoints, self._checkpoints = self._checkpoints, None
            await checkpoints.close()

    async def _hello(self) -> Hello | None:
        while True:
            batch, ended = self._input.read_available()
            if batch:
                kind, value = batch[0]
                return value if kind == ipc.HELLO else None
            if ended:
                return None
            await asyncio.sleep(0.01)

    async def _flush(self, writer: AuditWriter, flush_id: int) -> None:
        ok = await writer.flush()
        self._send_status()
        self.send(ipc.FLUSHED, (flush_id, ok))

    async def _report(self) -> None:
        while True:
            self._send_status()
            await asyncio.sleep(STATUS_EVERY)

    def _send_status(self) -> None:
        status = self._status()
        if status != self._last_status:
            self._last_status = status
            self.send(ipc.STATUS, status)

    def _status(self) -> Status:
        writer = self._writer
        assert writer is not None
        dropped = tuple((s.labels["reason"], s.value) for m in metrics.AUDIT_DROPPED.collect() for s in m.samples
                        if s.name.endswith("_total"))
        return Status(self._received, writer.backlog, writer.refusal(),
                      _total(metrics.AUDIT_RECORDS), _total(metrics.AUDIT_WRITE_ERRORS), dropped)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _total(counter: Any) -> float:
    return next((s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")), 0.0)


async def main() -> int:
    # Frames use the original stdout; anything a library prints goes to stderr instead of corrupting them.
    frames_fd = os.dup(1)
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(frames_fd, "wb", buffering=0))
    try:
        return await Worker(ipc.PolledPipe(0), out).run()
    finally:
        out.close()


def run() -> None:
    # The proxy decides when the worker stops (CLOSE, or its own end): a Ctrl-C or SIGHUP meant for the proxy's
    # process group must not cut the worker short while it still has records to spool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from bastion.logs import configure_logging

    configure_logging()
    # Below the proxy: when both want the same core, the call in flight goes first and the worker catches up in
    # the gaps. +5 still gives it about a quarter of a core the proxy saturates, about what it needs per call.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    sys.exit(asyncio.run(main()))


if __name__ == "__main__":
    run()
