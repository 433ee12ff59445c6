"""`AuditWriter`: non-blocking submit, spool first, drain to the sink.

`bastion serve` runs it in the audit worker process (`bastion.audit.worker`), fed with exchange snapshots by
the proxy's `bastion.audit.client.AuditClient`; tests and tools may run it in their own process.

Path of a record:

    caller (event loop)      submit(record, bodies) or submit_exchange(snapshot)    O(1): a queue put
    spool thread             (snapshot -> record) -> finalize (decode, redact) -> chain link -> spool append
                             (one os.write for the records that arrived together)
                             -> `on_record(record)` for each, if set (tracing: `bastion.audit.tracing`)
                             fdatasync at least every `sync_interval` (0.2 s), or at once for flush()
    drain task (event loop)  read synced entries (from `RecentWindow`, the entries the spool thread just wrote,
                             or by spool I/O on its own thread) -> store.write(batch)
                             -> move the spool cursor; on sink failure back off and retry, in order

Durability: once `submit` returned True the record is in the writer's memory; within milliseconds (while the
writer keeps up) it is written to the spool, from where a killed process recovers it; within `sync_interval`
it is on disk for a power cut too. So a record submitted more than a second ago survives SIGKILL, and the
`bastion_audit_backlog` gauge says whether the writer keeps up. A sink outage only grows the spool (bounded by
`max_spool_bytes`); records drain in order once the sink is back, also after a restart.

Failure: `submit` returns False, and counts `bastion_audit_dropped_total{reason}`, only when the record cannot
be taken: the spool cannot be written (`spool_error`), is full (`spool_full`), the writer is `overloaded`
(too many bytes waiting to be spooled) or `closed`. Since the record is submitted after the exchange, the
proxy asks *before* forwarding: `must_refuse()` (here, or the client's, which knows this writer's `refusal()`
from the worker's status) is True while records cannot be taken and `audit.on_failure` is "deny"; the proxy
then answers 503 `audit_unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion import metrics
from bastion.audit.bodies import BodyCapture, CapturedBody
from bastion.audit.chain import Chain, ChainHead
from bastion.audit.drops import Drops
from bastion.audit.entry import Entry
from bastion.audit.finalize import prepare
from bastion.audit.recent import RecentWindow, Spooled
from bastion.audit.record import AuditRecord
from bastion.audit.redact import Redactor
from bastion.audit.settings import AuditConfig
from bastion.audit.sinks import AuditStore, open_store
from bastion.audit.snapshot import ExchangeSnapshot
from bastion.audit.spool import DEFAULT_SEGMENT_BYTES, Position, Spool, SpoolState

log = logging.getLogger("bastion.audit")

_RECORD_OVERHEAD = 2048  # rough in-memory size of a record without bodies, for the pending-bytes bound
_RECENT_BYTES = 32 << 20  # spooled entries kept in memory for the drain, so it rarely re-reads the spool
_SPOOL_FINISH = 10.0  # seconds `close` waits at least for the spool thread to write what it was given


@dataclass(slots=True)
class _Job:
    record: AuditRecord | ExchangeSnapshot  # a snapshot becomes its record on the spool thread
    request_body: CapturedBody | None
    response_body: CapturedBody | None
    nbytes: int
    settings: tuple[AuditConfig, Redactor]  # as they were when the record was submitted


@dataclass(slots=True)
class _Prepared:
    record: AuditRecord
    request_blob: bytes | None
    response_blob: bytes | None
    nbytes: int


@dataclass(slots=True)
class _Flush:
    future: asyncio.Future[bool]


_STOP = object()


class AuditWriter:
    """Create with `await AuditWriter.open(url, spool_dir, config=...)`; see the module docstring."""

    def __init__(self, store: AuditStore, spool: Spool, state: SpoolState, config: AuditConfig, *,
                 loop: asyncio.AbstractEventLoop, sync_interval: float, batch_size: int, max_spool_bytes: int,
                 max_pending_bytes: int) -> None:
        self._store = store
        self._spool = spool
        self._loop = loop
        self._key = state.key
        self._settings = (config, self._redactor_for(config))
        self._chain = Chain(state.head)
        self.writer_id = state.writer
        self._sync_interval = sync_interval
        self._batch_size = batch_size
        self._max_spool_bytes = max_spool_bytes
        self._max_pending_bytes = max_pending_bytes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self._backlog = state.pending
        self._spool_ok = True
        self._closing = False
        self._closed = False
        self._cursor = state.cursor
        self._drained = state.drained
        self._waiters: list[tuple[Position, asyncio.Future[bool]]] = []
        # Filled by the spool thread, read by the drain: see `bastion.audit.recent`.
        self._recent = RecentWindow(_RECENT_BYTES)
        self._wake = asyncio.Event()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-drain")
        self._thread = threading.Thread(target=self._spool_main, name="bastion-audit-spool", daemon=True)
        self._drain_task: asyncio.Task[None] | None = None
        self._drops = Drops()
        self.on_drained: Callable[[ChainHead], None] | None = None
        """Called on the event loop with the chain head each time the sink took records (signed checkpoints)."""
        self.on_record: Callable[[AuditRecord], None] | None = None
        """Called on the spool thread with each record once it is spooled: redacted, chained, final (tracing).
        Must be quick and must not change the record; its exceptions are logged and otherwise ignored."""
        self._observer_quiet_until = 0.0
        metrics.AUDIT_BACKLOG.inc(state.pending)

    @classmethod
    async def open(
        cls,
        url: str | AuditStore,
        spool_dir: str | Path,
        *,
        config: AuditConfig | None = None,
        store_options: dict[str, Any] | None = None,
        sync_interval: float = 0.2,
        batch_size: int = 500,
        max_spool_bytes: int = 1 << 30,
        max_pending_bytes: int = 256 << 20,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> AuditWriter:
        """Recover the spool in `spool_dir` and start writing to the store at `url` (or a ready `AuditStore`).

        Does not wait for the sink: if it is down, records wait in the spool. Raises StoreError for an audit
        URL Bastion does not understand and SpoolLockedError when another process uses the spool.
        """
        store = url if isinstance(url, AuditStore) else open_store(url, **(store_options or {}))
        spool = Spool(spool_dir, segment_bytes=segment_bytes)
        state = await asyncio.to_thread(spool.open)
        self = cls(store, spool, state, config or AuditConfig(), loop=asyncio.get_running_loop(),
                   sync_interval=sync_interval, batch_size=batch_size, max_spool_bytes=max_spool_bytes,
                   max_pending_bytes=max_pending_bytes)
        self._thread.start()
        self._drain_task = asyncio.create_task(self._drain(), name="bastion-audit-drain")
        if state.pending:
            log.info("audit spool %s: %d records from before the restart will be drained", spool.directory,
                     state.pending)
        return self

    # --- the proxy's API -------------------------------------------------------------------------------------

    @property
    def config(self) -> AuditConfig:
        return self._settings[0]

    @property
    def store(self) -> AuditStore:
        """The sink (retention may run on it; readers should open their own)."""
        return self._store

    @property
    def spool_directory(self) -> Path:
        return self._spool.directory

    @property
    def drained_head(self) -> ChainHead | None:
        """The last record the sink took, as far as this writer knows (also from before a restart)."""
        return self._drained

    @property
    def backlog(self) -> int:
        """Records accepted (or left from before a restart) that are not in the sink yet."""
        with self._lock:
            return self._backlog

    @property
    def available(self) -> bool:
        """Whether `submit` would take a record now."""
        return self.refusal() is None

    def must_refuse(self) -> bool:
        """Call before forwarding a request: True when records cannot be taken and `on_failure` is deny."""
        return self._settings[0].on_failure == "deny" and not self.available

    def configure(self, config: AuditConfig) -> None:
        """Apply new settings (after a policy reload) to records submitted from now on."""
        self._settings = (config, self._redactor_for(config))

    def capture(self, *, content_encoding: str = "", content_type: str = "") -> BodyCapture:
        """A `BodyCapture` with the configured `max_body_bytes` cap."""
        return BodyCapture(self._settings[0].max_body_bytes, content_encoding=content_encoding,
                           content_type=content_type)

    def submit(self, record: AuditRecord, request_body: CapturedBody | None = None,
               response_body: CapturedBody | None = None) -> bool:
        """Hand one finished exchange to the writer. Never blocks; safe to call from the event loop.

        The record then belongs to the writer (it is redacted in place on another thread): do not touch it
        again. Returns False (and counts the drop) when the record cannot be taken; see the module docstring.
        """
        body_bytes = (len(request_body.raw) if request_body else 0) + (len(response_body.raw) if response_body else 0)
        return self._enqueue(record, request_body, response_body, body_bytes)

    def submit_exchange(self, snapshot: ExchangeSnapshot) -> bool:
        """Like `submit`, for an exchange as the proxy snapshot it: the record is built on the spool thread."""
        return self._enqueue(snapshot, None, None, snapshot.body_bytes)

    def _enqueue(self, item: AuditRecord | ExchangeSnapshot, request_body: CapturedBody | None,
                 response_body: CapturedBody | None, body_bytes: int) -> bool:
        reason = self.refusal()
        nbytes = _RECORD_OVERHEAD + body_bytes
        if reason is None:
            with self._lock:
                if self._pending_bytes + nbytes > self._max_pending_bytes:
                    reason = "overloaded"
                else:
                    self._pending_bytes += nbytes
                    self._backlog += 1
        if reason is not None:
            self._drops.count(reason, item.id)
            return False
        metrics.AUDIT_BACKLOG.inc()
        self._queue.put(_Job(item, request_body, response_body, nbytes, self._settings))
        return True

    async def flush(self) -> bool:
        """Wait until every record submitted before this call is in the sink; False when the writer cannot
        make progress any more. While the sink is down this waits: bound it with `asyncio.timeout` (records
        stay safe in the spool either way)."""
        if not self._thread.is_alive():
            return False
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._queue.put(_Flush(fut))
        while True:
            done, _ = await asyncio.wait({fut}, timeout=1.0)
            if done:
                return fut.result()
            if not self._thread.is_alive():  # it died holding our request: nobody will answer it
                return False

    async def close(self, *, drain_for: float = 10.0) -> bool:
        """Stop taking records, give the sink `drain_for` seconds to take the rest, release the spool.
        Anything not drained stays in the spool for the next `open`. True when everything reached the sink."""
        if self._closed:
            return True
        self._closing = True
        deadline = self._loop.time() + drain_for
        drained = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_for):
                drained = await self.flush()
        self._queue.put(_STOP)
        # Spooling what was taken is local disk work and must finish even when the sink got no time at all.
        await asyncio.to_thread(self._thread.join, max(_SPOOL_FINISH, deadline - self._loop.time()))
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        for fut in (f for _, f in self._waiters if not f.done()):
            fut.set_result(False)
        try:
            async with asyncio.timeout(5.0):
                await self._store.close()
        except Exception as e:  # a hung or broken connection must not stop the shutdown
            log.warning("audit sink %s: error while closing: %s", self._store.display_url, e or type(e).__name__)
        await self._loop.run_in_executor(self._io, self._spool.close)
        self._io.shutdown(wait=False)
        with self._lock:
            left, self._backlog = self._backlog, 0
        metrics.AUDIT_BACKLOG.dec(left)
        self._closed = True
        return drained

    # --- internals: shared ------------------------------------------------------------------------------------

    def _redactor_for(self, config: AuditConfig) -> Redactor:
        return Redactor(headers=config.redact_headers, json_keys=config.redact_json_keys,
                        patterns=config.redact_patterns, key=self._key)

    def refusal(self) -> str | None:
        """Why `submit` would not take a record now (the `bastion_audit_dropped_total` reason), or None."""
        if self._closing:
            return "closed"
        if not self._spool_ok or not self._thread.is_alive():
            return "spool_error"
        if self._spool.disk_bytes >= self._max_spool_bytes:
            return "spool_full"
        return None

    def _call_soon(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)

    # --- internals: the spool thread -------------------------------------------------------------------------

    def _spool_main(self) -> None:
        try:
            self._spool_loop()
        except BaseException:
            log.critical("audit spool thread failed; records can no longer be taken", exc_info=True)
            self._spool_ok = False
            self._call_soon(self._fail_waiters)

    def _spool_loop(self) -> None:
        retry: deque[_Prepared] = deque()
        flushes: list[_Flush] = []
        dirty, stop = False, False
        last_sync = next_retry = time.monotonic()
        while True:
            now = time.monotonic()
            if dirty:
                timeout: float | None = max(0.0, last_sync + self._sync_interval - now)
            elif retry:
                timeout = max(0.0, next_retry - now)
            else:
                timeout = None
            items: list[Any] = []
            with contextlib.suppress(queue.Empty):
                items.append(self._queue.get(timeout=timeout))
                while len(items) < 256:
                    items.append(self._queue.get_nowait())
            batch: list[_Prepared] = []
            for item in items:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    prepared = self._prepare(item)
                    if prepared is not None:
                        batch.append(prepared)
            if batch:
                left = batch if retry else self._append(batch)  # behind earlier failures: keep the order
                dirty = dirty or len(left) < len(batch)
                if left:
                    retry.extend(left)
                    next_retry = time.monotonic() + 1.0
            if retry and (stop or time.monotonic() >= next_retry):
                left = self._append(list(retry))
                dirty = dirty or len(left) < len(retry)
                retry = deque(left)
                next_retry = time.monotonic() + 1.0
            now = time.monotonic()
            if dirty and (now - last_sync >= self._sync_interval or flushes or stop) and self._sync():
                dirty, last_sync = False, now
            if flushes and not retry and not dirty:
                pos = self._spool.synced
                for fl in flushes:
                    self._call_soon(self._flush_synced, fl.future, pos)
                flushes = []
            if stop:
                for p in retry:
                    self._lost(p.nbytes, "spool_error")
                for fl in flushes:
                    self._call_soon(_set, fl.future, False)
                return

    def _prepare(self, job: _Job) -> _Prepared | None:
        config, redactor = job.settings
        done = prepare(job.record, job.request_body, job.response_body, redactor=redactor,
                       max_body_bytes=config.max_body_bytes)
        if done is None:
            self._lost(job.nbytes, "invalid")
            return None
        return _Prepared(done.record, done.request_blob, done.response_blob, job.nbytes)

    def _append(self, batch: list[_Prepared]) -> list[_Prepared]:
        """Chain and spool records, in order, with one write for the lot (`Spool.append_many`). Returns those
        not written because the spool failed: the chain then continues from the last record written, so
        they are linked again, at the same positions, when retried."""
        linked: list[tuple[_Prepared, Entry, bytes]] = []
        base = self._chain.head
        for p in batch:
            entry = self._link(p)
            if entry is not None:
                linked.append((p, entry, entry.frame()))
        spans, error = self._spool.append_many([frame for _, _, frame in linked])
        if error is not None:
            if self._spool_ok:
                log.error("audit spool %s: cannot write (%s); refusing records until it can",
                          self._spool.directory, error)
            self._spool_ok = False
        written = linked[:len(spans)]
        last = written[-1][1] if written else None
        self._chain.advance(ChainHead(last.writer, last.seq, last.hash) if last is not None else base)
        self._recent.add(Spooled(start, end, entry, len(frame))
                         for (_, entry, frame), (start, end) in zip(written, spans, strict=True))
        if written and error is None and not self._spool_ok:
            log.warning("audit spool %s: writable again", self._spool.directory)
            self._spool_ok = True
        with self._lock:
            self._pending_bytes -= sum(p.nbytes for p, _, _ in written)
        observer = self.on_record
        if written and observer is not None:
            self._observe(observer, [p.record for p, _, _ in written])
        return [p for p, _, _ in linked[len(spans):]]

    def _observe(self, observer: Callable[[AuditRecord], None], records: list[AuditRecord]) -> None:
        for record in records:
            try:
                observer(record)
            except Exception:
                now = time.monotonic()
                if now >= self._observer_quiet_until:  # at most one log line a minute
                    self._observer_quiet_until = now + 60.0
                    log.exception("audit record %s: the record observer failed", record.id)

    def _link(self, p: _Prepared) -> Entry | None:
        """Give the record the next place in the chain (advanced at once; `_append` winds it back to the last
        record written). None when the record cannot be encoded: it is counted as lost."""
        try:
            data, head = self._chain.link(p.record)
        except (TypeError, ValueError):  # `extra` held something that is not JSON
            log.error("audit record %s: extra facts are not JSON; they are left out", p.record.id)
            p.record.extra = {"audit_error": "extra facts were not JSON-serialisable"}
            try:
                data, head = self._chain.link(p.record)
            except (TypeError, ValueError):
                log.exception("audit record %s: cannot be encoded; dropped", p.record.id)
                self._lost(p.nbytes, "invalid")
                return None
        self._chain.advance(head)
        return Entry(head.writer, head.seq, head.hash, data, p.request_blob, p.response_blob, p.record)

    def _sync(self) -> bool:
        try:
            self._spool.sync()
        except OSError as e:
            log.error("audit spool %s: fsync failed: %s", self._spool.directory, e)
            self._spool_ok = False
            return False
        self._call_soon(self._wake.set)
        return True

    def _lost(self, nbytes: int, reason: str) -> None:
        with self._lock:
            self._pending_bytes -= nbytes
            self._backlog -= 1
        metrics.AUDIT_BACKLOG.dec()
        metrics.AUDIT_DROPPED.labels(reason=reason).inc()

    # --- internals: the drain (event loop) -------------------------------------------------------------------

    def _flush_synced(self, fut: asyncio.Future[bool], pos: Position) -> None:
        if fut.done():
            return
        if pos <= self._cursor:
            fut.set_result(True)
        else:
            self._waiters.append((pos, fut))
            self._wake.set()

    def _fail_waiters(self) -> None:
        for _, fut in self._waiters:
            _set(fut, False)
        self._waiters.clear()

    def _resolve_waiters(self) -> None:
        still = []
        for pos, fut in self._waiters:
            if pos <= self._cursor:
                _set(fut, True)
            elif not fut.done():
                still.append((pos, fut))
        self._waiters = still

    async def _drain(self) -> None:
        backoff, failing_since, last_log, opened = 0.25, 0.0, 0.0, False
        while True:
            try:
                if not opened:
                    await self._store.open()
                    opened = True
                batch = self._from_memory()
                if batch is None:
                    batch = await self._loop.run_in_executor(
                        self._io, functools.partial(self._spool.read, self._cursor, limit=self._batch_size))
                entries, nxt = batch
                if not entries:
                    if nxt != self._cursor:  # skipped an unreadable stretch of the spool
                        await self._commit(nxt, self._drained, 0)
                        continue
                    self._wake.clear()
                    if self._spool.synced > self._cursor:
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                await self._store.write(entries)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any sink failure: keep the records in the spool and try again
                metrics.AUDIT_WRITE_ERRORS.inc()
                now = time.monotonic()
                if not failing_since or now - last_log >= 60.0:
                    log.warning("audit sink %s unavailable (%s); records wait in the spool (%d)",
                                self._store.display_url, e or type(e).__name__, self.backlog)
                    last_log = now
                failing_since = failing_since or now
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if failing_since:
                log.warning("audit sink %s is back; draining %d records", self._store.display_url, self.backlog)
                failing_since = 0.0
            backoff = 0.25
            last = entries[-1]
            await self._commit(nxt, ChainHead(last.writer, last.seq, last.hash), len(entries))

    def _from_memory(self) -> tuple[list[Entry], Position] | None:
        """The next batch from the in-memory copy of what was spooled, if it starts at the cursor."""
        return self._recent.take(self._cursor, self._spool.synced, self._batch_size)

    async def _commit(self, nxt: Position, head: ChainHead | None, n: int) -> None:
        self._drained = head
        try:
            await self._loop.run_in_executor(self._io, self._spool.commit, nxt, head, self._store.display_url)
        except OSError as e:  # the sink has the records; a stale cursor only means re-sending them later
            log.error("audit spool %s: cannot save the drain position: %s", self._spool.directory, e)
        self._cursor = nxt
        if n:
            with self._lock:
                self._backlog -= n
            metrics.AUDIT_RECORDS.inc(n)
            metrics.AUDIT_BACKLOG.dec(n)
        self._resolve_waiters()
        if n and head is not None and self.on_drained is not None:
            self.on_drained(head)


def _set(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)
