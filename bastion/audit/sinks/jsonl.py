"""JSON-lines audit store (`jsonl:///dir`): plain files a SIEM shipper (Filebeat, Vector, Fluent Bit) can tail.

Layout: `<dir>/<writer id>/<first seq>.jsonl`, one record per line in the export shape (the record JSON with
its `hash` and the bodies' content: `{"text": ...}` or `{"base64": ...}`). The active file rotates at
`max_file_bytes` or at UTC midnight; a closed file is gzip-compressed (`.jsonl.gz`), which is how bodies are
compressed at rest here. Retention works on whole closed files: it deletes the oldest ones (leaving
`pruned.json`, the prune marker) and rewrites old ones without bodies (`.purged.jsonl.gz`).

Reads (`show`, `export`, `verify`) scan the files: fine for a SIEM hand-off, slow as a query engine; use
SQLite or PostgreSQL when the dashboard is the main reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from bastion.audit.bodies import DecodeError, unpack
from bastion.audit.entry import Entry
from bastion.audit.record import AuditRecord, Body, RecordError, canonical, hashed_form
from bastion.audit.sinks.base import (
    MAX_PAGE,
    AuditStore,
    ChainRow,
    Page,
    PruneMarker,
    RecordQuery,
    StoreError,
    matches_facts,
    page_key,
    parse_page_key,
)
from bastion.private_files import open_private, tighten

log = logging.getLogger("bastion.audit")
T = TypeVar("T")
DEFAULT_MAX_FILE_BYTES = 64 << 20


@dataclass(slots=True)
class _Active:
    path: Path | None
    size: int
    day: int
    last_seq: int


def _first_seq(path: Path) -> int:
    return int(path.name.split(".", 1)[0])


def _day(us: float) -> int:
    return int(us // 86_400_000_000)


class JsonlStore(AuditStore):
    def __init__(self, directory: str | Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.directory = Path(directory)
        self.display_url = f"jsonl:///{self.directory.absolute()}"
        self.max_file_bytes = max_file_bytes
        self._executor: ThreadPoolExecutor | None = None
        self._active: dict[str, _Active] = {}
        self._open = False

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bastion-audit-jsonl")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        if not self._open:
            await self._run(self._open_sync)

    def _open_sync(self) -> None:
        if not self.directory.parent.is_dir():
            raise StoreError(f"{self.display_url}: directory {self.directory.parent} does not exist")
        self.directory.mkdir(exist_ok=True, mode=0o700)
        self._tighten()
        self._open = True

    def _tighten(self) -> None:
        """Records and bodies are sensitive: writer directories and files are owner-only. New ones are created
        so; ones an older version left readable by others are narrowed here (with a warning). The top
        directory is left as it is, it may be a shared log directory."""
        for writer in self._writer_dirs():
            d = self.directory / writer
            tighten(d)
            with contextlib.suppress(OSError):
                for p in d.iterdir():
                    tighten(p)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._active.clear()
        self._open = False

    # --- files -----------------------------------------------------------------------------------------------

    def _files(self, writer: str) -> list[Path]:
        d = self.directory / writer
        if not d.is_dir():
            return []
        files = [p for p in d.iterdir() if p.name[:1].isdigit() and ".jsonl" in p.name and not p.name.endswith(".tmp")]
        by_seq: dict[int, Path] = {}
        for p in files:
            n = _first_seq(p)
            # A crash while compressing leaves both forms: the plain one is complete, the other may not be.
            if n not in by_seq or p.suffix == ".jsonl":
                by_seq[n] = p
        return [by_seq[n] for n in sorted(by_seq)]

    def _writer_dirs(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir())

    @staticmethod
    def _lines(path: Path) -> Iterator[dict[str, Any]]:
        opener: Callable[..., IO[bytes]] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
        try:
            with opener(path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        return  # a line still being written
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        log.warning("audit store %s: unreadable line skipped", path)
                        continue
                    if isinstance(obj, dict):
                        yield obj
        except FileNotFoundError:  # rotated or pruned while we looked
            return

    def _records(self, writer: str, start: int = 0) -> Iterator[dict[str, Any]]:
        files = self._files(writer)
        first = 0
        for i, p in enumerate(files):  # skip whole files that end before `start`
            if _first_seq(p) <= start:
                first = i
        for p in files[first:]:
            for obj in self._lines(p):
                if _seq(obj) >= start:
                    yield obj

    # --- writing ---------------------------------------------------------------------------------------------

    async def write(self, entries: Sequence[Entry]) -> None:
        if entries:
            await self._run(self._write_sync, entries)

    def _state(self, writer: str) -> _Active:
        state = self._active.get(writer)
        if state is not None:
            return state
        (self.directory / writer).mkdir(exist_ok=True, mode=0o700)
        files = self._files(writer)
        marker = self._marker(writer)
        state = _Active(None, 0, 0, marker.seq if marker else 0)
        if files:
            last = files[-1]
            if last.suffix == ".jsonl":
                _cut_partial_line(last)
                state.path, state.size = last, last.stat().st_size
                state.day = _day(last.stat().st_mtime * 1e6)
            for obj in self._lines(last):
                state.last_seq = max(state.last_seq, _seq(obj))
        self._active[writer] = state
        return state

    def _write_sync(self, entries: Sequence[Entry]) -> None:
        if not self._open:
            raise StoreError(f"{self.display_url}: store is not open")
        touched: dict[Path, IO[bytes]] = {}
        try:
            for e in entries:
                state = self._state(e.writer)
                if e.seq <= state.last_seq:
                    continue
                today = _day(time.time() * 1e6)
                if state.path is None or state.size >= self.max_file_bytes or state.day != today:
                    if state.path is not None:
                        f = touched.pop(state.path, None)
                        if f is not None:
                            f.flush()
                            os.fsync(f.fileno())
                            f.close()
                        self._compress(state.path)
                    state.path = self.directory / e.writer / f"{e.seq:012d}.jsonl"
                    state.size, state.day = 0, today
                f = touched.get(state.path)
                if f is None:
                    f = touched[state.path] = open_private(state.path)
                line = _line(e)
                f.write(line)
                state.size += len(line)
                state.last_seq = e.seq
            for f in touched.values():
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._active.clear()  # re-read the files' state on the next attempt
            raise
        finally:
            for f in touched.values():
                f.close()

    @staticmethod
    def _compress(path: Path) -> None:
        target = path.with_name(path.name + ".gz")
        tmp = target.with_name(target.name + ".tmp")
        with open(path, "rb") as src, open_private(tmp, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
        path.unlink()

    # --- reading ---------------------------------------------------------------------------------------------

    def _all(self) -> Iterator[dict[str, Any]]:
        for writer in self._writer_dirs():
            yield from self._records(writer)

    async def get(self, record_id: str) -> AuditRecord | None:
        return await self._run(self._get_sync, record_id)

    def _get_sync(self, record_id: str) -> AuditRecord | None:
        for obj in self._all():
            if obj.get("id") == record_id:
                return _parse(obj)
        return None

    async def query(self, q: RecordQuery) -> Page:
        return await self._run(self._query_sync, q)

    def _query_sync(self, q: RecordQuery) -> Page:
        key = parse_page_key(q.cursor) if q.cursor else None
        hits: list[tuple[tuple[int, str, int], dict[str, Any]]] = []
        for obj in self._all():
            rec = _parse(obj, bodies=q.bodies)
            if rec is None or not _matches(rec, q):
                continue
            k = (rec.started_us, rec.chain.writer if rec.chain else "", rec.chain.seq if rec.chain else 0)
            if key is not None and ((k <= key) if q.ascending else (k >= key)):
                continue
            hits.append((k, obj))
        hits.sort(key=lambda h: h[0], reverse=not q.ascending)
        limit = max(1, min(q.limit, MAX_PAGE))
        records = [r for r in (_parse(o, bodies=q.bodies) for _, o in hits[:limit]) if r is not None]
        return Page(records, page_key(records[-1]) if len(hits) > limit and records else None)

    async def scan(self, q: RecordQuery) -> AsyncIterator[AuditRecord]:
        """Storage order, writer by writer, one pass over the files: each `query` page would read them all."""
        objs = self._all()
        while True:
            batch = await self._run(_matching, objs, q, max(1, min(q.limit, MAX_PAGE)))
            if not batch:
                return
            for record in batch:
                yield record

    async def changes(self, token: str | None, limit: int = 500) -> tuple[list[AuditRecord], str]:
        return await self._run(self._changes_sync, token, limit)

    def _changes_sync(self, token: str | None, limit: int) -> tuple[list[AuditRecord], str]:
        try:
            seen: dict[str, int] = json.loads(token) if token else {}
        except ValueError:
            raise StoreError(f"bad change token {token!r}") from None
        # A token is a JSON object of writer -> last seq; anything else (a SQL store's number, a hand-edited
        # value) must be refused here, not fail later on `.get` or on arithmetic.
        if not isinstance(seen, dict) or not all(type(v) is int for v in seen.values()):
            raise StoreError(f"bad change token {token!r}")
        out: list[AuditRecord] = []
        for writer in self._writer_dirs():
            if token is None:  # just find where each chain ends now
                files = self._files(writer)
                seen[writer] = max((_seq(o) for o in self._lines(files[-1])), default=0) if files else 0
                continue
            last = seen.get(writer, 0)
            for obj in self._records(writer, last + 1):
                if len(out) >= limit:
                    break
                rec = _parse(obj)
                if rec is not None:
                    out.append(rec)
                last = _seq(obj)
            seen[writer] = last
        return out, json.dumps(seen, sort_keys=True)

    async def writers(self) -> list[str]:
        return await self._run(lambda: [w for w in self._writer_dirs() if self._files(w) or self._marker(w)])

    def _marker(self, writer: str) -> PruneMarker | None:
        try:
            d = json.loads((self.directory / writer / "pruned.json").read_bytes())
            return PruneMarker(writer, int(d["seq"]), str(d["hash"]), d.get("ended_us"), int(d["pruned_us"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{self.display_url}: {writer}/pruned.json is corrupt") from None

    async def prune_markers(self) -> dict[str, PruneMarker]:
        def run() -> dict[str, PruneMarker]:
            return {w: m for w in self._writer_dirs() if (m := self._marker(w)) is not None}
        return await self._run(run)

    async def chain_rows(self, writer: str) -> AsyncIterator[ChainRow]:
        it = await self._run(lambda: iter(self._records(writer)))
        while True:
            batch = await self._run(_take, it, 500)
            for obj in batch:
                yield _chain_row(obj)
            if len(batch) < 500:
                return

    # --- retention -------------------------------------------------------------------------------------------

    async def prune_records(self, cutoff_us: int, now_us: int) -> int:
        return await self._run(self._prune_sync, cutoff_us, now_us)

    def _prune_sync(self, cutoff_us: int, now_us: int) -> int:
        total = 0
        for writer in self._writer_dirs():
            files = self._files(writer)
            for path in files[:-1]:  # never the newest file: the writer may still append to it
                lines = list(self._lines(path))
                if not lines or any(int(o.get("started_us", 0)) >= cutoff_us for o in lines):
                    break
                last = lines[-1]
                _write_json(self.directory / writer / "pruned.json", {
                    "writer": writer, "seq": _seq(last), "hash": last.get("hash"),
                    "ended_us": last.get("ended_us"), "pruned_us": now_us})
                path.unlink()
                total += len(lines)
        return total

    async def purge_bodies(self, cutoff_us: int, now_us: int) -> int:
        return await self._run(self._purge_sync, cutoff_us, now_us)

    def _purge_sync(self, cutoff_us: int, now_us: int) -> int:
        total = 0
        for writer in self._writer_dirs():
            for path in self._files(writer)[:-1]:
                if ".purged." in path.name or path.suffix != ".gz":
                    continue
                lines = list(self._lines(path))
                if any(int(o.get("started_us", 0)) >= cutoff_us for o in lines):
                    break
                target = path.with_name(f"{_first_seq(path):012d}.purged.jsonl.gz")
                tmp = target.with_name(target.name + ".tmp")
                with open_private(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as f:
                    for obj in lines:
                        stripped = hashed_form(obj)
                        # Like the SQL stores: only a record that had body content (which `hashed_form` drops)
                        # loses bodies, says when, and is counted.
                        had_bodies = stripped != {k: v for k, v in obj.items() if k not in ("hash", "purged_us")}
                        stripped["hash"] = obj.get("hash")
                        if had_bodies:
                            stripped["purged_us"] = now_us
                            total += 1
                        f.write(json.dumps(stripped, sort_keys=True, separators=(",", ":"),
                                           ensure_ascii=False).encode() + b"\n")
                os.replace(tmp, target)
                path.unlink()
        return total


# --- helpers -------------------------------------------------------------------------------------------------

def _seq(obj: dict[str, Any]) -> int:
    chain = obj.get("chain")
    return int(chain.get("seq", 0)) if isinstance(chain, dict) else 0


def _line(e: Entry) -> bytes:
    rec = e.record
    for body, blob in ((rec.request.body, e.request_body), (rec.response.body if rec.response else None,
                                                            e.response_body)):
        if body is not None and blob is not None:
            with contextlib.suppress(DecodeError):
                body.content = unpack(blob, body.stored)
    obj = rec.to_json(with_content=True, with_hash=True)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _parse(obj: dict[str, Any], *, bodies: bool = True) -> AuditRecord | None:
    try:
        rec = AuditRecord.from_json(obj)
    except RecordError as e:
        log.warning("audit store: record skipped: %s", e)
        return None
    if not bodies:
        for body in (rec.request.body, rec.response.body if rec.response else None):
            if body is not None:
                body.content = None
    return rec


def _matches(rec: AuditRecord, q: RecordQuery) -> bool:
    return ((q.agent is None or rec.agent == q.agent) and (q.effect is None or rec.effect == q.effect)
            and (q.outcome is None or rec.outcome == q.outcome)
            and (q.host is None or rec.request.host == q.host.lower())
            and (not q.text or q.text.lower() in rec.request.url.lower() or rec.id == q.text)
            and (q.since_us is None or rec.started_us >= q.since_us)
            and (q.until_us is None or rec.started_us < q.until_us)
            and matches_facts(rec.extra, q.model, q.tool))


def _chain_row(obj: dict[str, Any]) -> ChainRow:
    bodies: list[bytes | None] = []
    for part in ("request", "response"):
        body = None
        msg = obj.get(part)
        if isinstance(msg, dict) and isinstance(msg.get("body"), dict) and "content" in msg["body"]:
            try:
                b = Body.from_json(msg["body"])
                body = b.content
            except RecordError:
                body = b""  # unreadable content: verify reports the digest mismatch
        bodies.append(body)
    purged = obj.get("purged_us")
    return ChainRow(_seq(obj), str(obj.get("hash")), canonical(hashed_form(obj)), bodies[0], bodies[1],
                    purged if isinstance(purged, int) else None, {}, packed=False)


def _matching(objs: Iterator[dict[str, Any]], q: RecordQuery, n: int) -> list[AuditRecord]:
    """The next `n` records of `objs` that match `q` (fewer at the end)."""
    out: list[AuditRecord] = []
    for obj in objs:
        rec = _parse(obj, bodies=q.bodies)
        if rec is not None and _matches(rec, q):
            out.append(rec)
            if len(out) >= n:
                break
    return out


def _take(it: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    out = []
    for obj in it:
        out.append(obj)
        if len(out) >= n:
            break
    return out


def _cut_partial_line(path: Path) -> None:
    """Drop a line a crash left half-written, so the next record starts on a line of its own."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                if end < size:
                    f.truncate(end)
                return
            pos -= step
        f.truncate(0)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open_private(tmp, "wb") as f:
        f.write(json.dumps(obj).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
