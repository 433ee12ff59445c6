"""What every audit store offers: batched idempotent writes for the writer, reads for the CLI and the
dashboard, chain walks for `verify`, and prefix pruning for retention.

All methods are coroutines that never block the calling event loop (SQLite and file stores run their I/O on
a thread of their own). A store instance may be used from one event loop at a time.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bastion.audit.entry import Entry
from bastion.audit.record import AuditRecord

MAX_PAGE = 1000
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class StoreError(Exception):
    """The store cannot be used (bad URL, unreachable, wrong schema). The message is safe to show."""


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """Filters for listing records. Times are Unix microseconds on `started_us` (since inclusive, until
    exclusive); `text` is a substring of the URL or the id. Pages come newest first unless `ascending`;
    `cursor` is a previous page's `next`. `bodies` loads body content too.

    `model` and `tool` match facts inside the record's `extra` exactly (see `record_models`, `called_tools`).
    They have no column and no index: the SQL stores test them on each record the newest-first index walk
    reaches (a substring test on the stored JSON text, then JSON functions on the records that contain the
    name), which is fine for the dashboard's page-sized walks: a page of a model found on one record in 50 reads
    some 2,500 records, 20-40 ms. A name that matches nothing reads the whole table (or the `since_us` range)
    before answering: about 0.6 s per 100,000 records of 2.5 KB on SQLite and on PostgreSQL. Narrow such
    searches with `since_us` or `agent`, which are indexed. The JSONL store scans its files for every query."""

    agent: str | None = None
    effect: str | None = None
    outcome: str | None = None
    host: str | None = None
    text: str | None = None
    model: str | None = None
    tool: str | None = None
    since_us: int | None = None
    until_us: int | None = None
    limit: int = 100
    cursor: str | None = None
    ascending: bool = False
    bodies: bool = False


@dataclass(slots=True)
class Page:
    records: list[AuditRecord]
    next: str | None


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One group of `AuditStore.stats`: records of `agent` with this effect, outcome and first determining rule,
    how many, and when the newest started."""

    agent: str | None
    effect: str | None
    outcome: str
    rule: str | None
    count: int
    last_us: int


@dataclass(frozen=True, slots=True)
class PruneMarker:
    """Retention removed records 1..`seq` of `writer`; `hash` is record `seq`'s hash, so the first survivor
    must point at it. `ended_us` is when that record ended, `pruned_us` when the pruning ran."""

    writer: str
    seq: int
    hash: str
    ended_us: int | None
    pruned_us: int


@dataclass(frozen=True, slots=True)
class ChainRow:
    """One stored record as it sits in the store, for `verify`: `seq` is where the store keeps it (its key),
    `canonical` the stored JSON bytes, `index` the store's own copies of record fields (search columns), which
    must agree with the JSON. Bodies are zlib-packed when `packed`, else plain."""

    seq: int
    hash: str
    canonical: bytes
    request_body: bytes | None
    response_body: bytes | None
    purged_us: int | None
    index: dict[str, Any] = field(default_factory=dict)
    packed: bool = True


def index_of(record: AuditRecord) -> dict[str, Any]:
    """The columns SQL stores keep beside the JSON for searching (verify checks they still agree)."""
    return {
        "id": record.id, "started_us": record.started_us, "ended_us": record.ended_us, "agent": record.agent,
        "method": record.request.method, "host": record.request.host, "url": record.request.url,
        "status": record.status, "effect": record.effect, "outcome": record.outcome,
    }


def record_models(extra: Mapping[str, Any]) -> set[str]:
    """The model names an LLM call's facts carry (`extra.llm`: model, request_model, response_model): what the
    `model` filter matches. Values that are not strings (a malformed or hostile record) are ignored."""
    llm = extra.get("llm")
    if not isinstance(llm, Mapping):
        return set()
    return {v for k in ("model", "request_model", "response_model") if isinstance(v := llm.get(k), str)}


def called_tools(extra: Mapping[str, Any]) -> list[str]:
    """The tools that were *called* in this exchange, in order: the MCP tool (`extra.mcp.tool`), then the
    names of the tool calls the model made (`extra.llm.tool_calls[].name`). What the `tool` filter matches;
    the tools a request merely offered (`extra.llm.tools`) are not calls and are left out."""
    names: list[str] = []
    mcp = extra.get("mcp")
    if isinstance(mcp, Mapping) and isinstance(tool := mcp.get("tool"), str):
        names.append(tool)
    llm = extra.get("llm")
    calls = llm.get("tool_calls") if isinstance(llm, Mapping) else None
    if isinstance(calls, list):
        names += [name for call in calls if isinstance(call, Mapping) and isinstance(name := call.get("name"), str)]
    return names


def matches_facts(extra: Mapping[str, Any], model: str | None, tool: str | None) -> bool:
    """The `model` and `tool` filters of `RecordQuery` in Python (the JSONL store, live views, `tail -f`)."""
    return (model is None or model in record_models(extra)) and (tool is None or tool in called_tools(extra))


def page_key(record: AuditRecord) -> str:
    assert record.chain is not None
    return f"{record.started_us}.{record.chain.writer}.{record.chain.seq}"


def parse_page_key(cursor: str) -> tuple[int, str, int]:
    """The key a `page_key` cursor names. StoreError for anything else, including numbers no store column can
    hold (SQLite and PostgreSQL keep 64-bit integers and would otherwise fail with a driver error)."""
    try:
        started, writer, seq = cursor.split(".")
        key = int(started), writer, int(seq)
    except ValueError:
        raise StoreError(f"bad page cursor {cursor!r}") from None
    if not (_INT64_MIN <= key[0] <= _INT64_MAX and _INT64_MIN <= key[2] <= _INT64_MAX):
        raise StoreError(f"bad page cursor {cursor!r}")
    return key


class AuditStore(abc.ABC):
    """An audit sink. Create with `bastion.audit.sinks.open_store(url)`, then `await store.open()` (or use
    `async with`)."""

    #: the URL with any password masked, for messages and logs
    display_url: str

    async def __aenter__(self) -> AuditStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed. Idempotent. Raises StoreError or OSError."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def write(self, entries: Sequence[Entry]) -> None:
        """Store a batch atomically. Entries already stored (same writer and seq) are skipped, so the drain
        can safely resend after a crash."""

    @abc.abstractmethod
    async def get(self, record_id: str) -> AuditRecord | None:
        """One record with its bodies' content, or None."""

    @abc.abstractmethod
    async def query(self, q: RecordQuery) -> Page: ...

    @abc.abstractmethod
    async def changes(self, token: str | None, limit: int = 500) -> tuple[list[AuditRecord], str]:
        """Records stored after `token`, in storage order, and the token to continue from. With token None,
        no records and the token of the current end (for `tail --follow`)."""

    @abc.abstractmethod
    async def writers(self) -> list[str]:
        """Every writer with records or a prune marker."""

    @abc.abstractmethod
    async def prune_markers(self) -> dict[str, PruneMarker]: ...

    @abc.abstractmethod
    def chain_rows(self, writer: str) -> AsyncIterator[ChainRow]:
        """The writer's stored records in ascending `seq` order."""

    @abc.abstractmethod
    async def prune_records(self, cutoff_us: int, now_us: int) -> int:
        """Delete, per writer, the longest chain prefix of records started before `cutoff_us`, leaving a prune
        marker in the same transaction. Returns the number of records deleted."""

    @abc.abstractmethod
    async def purge_bodies(self, cutoff_us: int, now_us: int) -> int:
        """Drop the bodies of records started before `cutoff_us`. Returns how many records lost bodies."""

    async def stats(self, since_us: int) -> list[StatsRow] | None:
        """Counts of the records started since `since_us`, grouped by agent, effect, outcome and rule, in one
        indexed range scan; None when the store cannot aggregate (JSONL), and pages then say so."""
        return None

    async def durations(self, since_us: int, limit: int = 1000) -> list[int]:
        """Total durations (µs) of the newest `limit` records started since `since_us` (for latency figures)."""
        return []

    async def iter_records(self, q: RecordQuery) -> AsyncIterator[AuditRecord]:
        """Every record matching `q` (its `limit` is the page size), following page cursors."""
        cursor = q.cursor
        while True:
            page = await self.query(replace(q, cursor=cursor))
            for record in page.records:
                yield record
            if page.next is None:
                return
            cursor = page.next

    async def scan(self, q: RecordQuery) -> AsyncIterator[AuditRecord]:
        """Every record matching `q`, streamed with bounded memory for a whole-log pass (`bastion replay`).
        Oldest first here (keyset pages of `q.limit`); a store that cannot page cheaply streams in storage
        order instead."""
        async for record in self.iter_records(replace(q, ascending=True, cursor=None)):
            yield record
