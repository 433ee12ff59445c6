"""Audit sinks: one behavioural suite over the `AuditStore` contract, run against SQLite, PostgreSQL and JSONL.

Every test in the suite runs once per sink: SQLite in a file of the test's own, JSONL in a directory of the
test's own (small files, so reads cross rotated, gzip'd files), PostgreSQL at 127.0.0.1:5432 (database `test`,
tests/services.py) in a schema unique to the test, dropped afterwards. With CI=true an unreachable PostgreSQL
fails the PostgreSQL runs; elsewhere they are skipped with the reason.

Records reach the stores through `AuditStore.write`, as the writer's drain hands them over: chained entries
with zlib-packed bodies, built here so each test chooses its times, writers and facts. Test names restate the
promise of `bastion.audit.sinks.base` they check. Where a sink may do less by its own documented design (JSONL
retention works on whole closed files and never touches the newest one; JSONL cannot aggregate), the data is
laid out so that the promise and the design meet, and the test says so.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from services import require_postgres

from bastion.audit.bodies import pack, unpack
from bastion.audit.chain import GENESIS, Chain, ChainHead, record_hash
from bastion.audit.entry import Entry
from bastion.audit.record import (
    AuditRecord,
    Body,
    DecisionFacts,
    ErrorFacts,
    Identity,
    Request,
    Response,
    Timings,
)
from bastion.audit.sinks import AuditStore, RecordQuery, StoreError, open_store
from bastion.audit.sinks.base import MAX_PAGE, page_key
from bastion.audit.verify import verify_store

S = 1_000_000  # one second in µs
T0 = 1_795_000_000_000_000
JSONL_FILE_BYTES = 16_000  # a few records per file: reads go through rotated .jsonl.gz files and the active one


@dataclass
class Backend:
    """Where one test's records live; `open()` gives another store object on the same data, the way the
    dashboard or the CLI sees what a sidecar wrote."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self, **options: Any) -> AuditStore:
        return open_store(self.url, **{**self.options, **options})


@pytest.fixture(params=["sqlite", "postgres", "jsonl"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'audit.db'}")
        return
    if request.param == "jsonl":
        yield Backend("jsonl", f"jsonl:///{tmp_path / 'logs'}", {"max_file_bytes": JSONL_FILE_BYTES})
        return
    dsn = require_postgres()
    schema = f"bastion_contract_test_{secrets.token_hex(6)}"
    yield Backend("postgres", f"{dsn}?schema={schema}")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[AuditStore]:
    async with backend.open() as s:
        yield s


# --- building chained entries as the writer's drain hands them to a sink -------------------------------------


def _body(data: bytes) -> tuple[Body, bytes]:
    digest = hashlib.sha256(data).hexdigest()
    return Body(len(data), digest, "application/json", "", len(data), digest), pack(data)


@dataclass
class Fact:
    """One exchange to store: the fields the query filters look at, and bodies (None: the exchange had none)."""

    id: str
    writer: str
    started_us: int
    agent: str | None = "support-bot"
    effect: str | None = "allow"
    outcome: str = "forwarded"
    method: str = "GET"
    url: str = "https://api.openai.com/v1/models"
    status: int | None = 200
    rules: tuple[str, ...] = ("llm-chat",)
    extra: dict[str, Any] = field(default_factory=dict)
    request_body: bytes | None = b'{"q": "refund order 42"}'
    response_body: bytes | None = b'{"ok": true}'

    def record(self) -> AuditRecord:
        response = None
        if self.status is not None:
            response = Response(self.status, "", source="upstream" if self.outcome == "forwarded" else "bastion")
        return AuditRecord(
            id=self.id, started_us=self.started_us, ended_us=self.started_us + 250_000,
            identity=Identity(self.agent, "basic" if self.agent else "missing", "127.0.0.1:50000"),
            request=Request(self.method, self.url, headers=[("Host", "example")]),
            outcome=self.outcome,  # type: ignore[arg-type]
            timings=Timings(total_us=250_000),
            response=response,
            error=None if self.outcome == "forwarded" else ErrorFacts(self.outcome, "test"),
            decision=None if self.effect is None else DecisionFacts(self.effect, self.effect, "enforce",
                                                                     list(self.rules)),
            extra=dict(self.extra),
        )


class Chains:
    """The writers' hash chains: `entries(facts)` links each fact's record next in its writer's chain."""

    def __init__(self) -> None:
        self._chains: dict[str, Chain] = {}
        self.bodies: dict[str, tuple[bytes | None, bytes | None]] = {}

    def entry(self, fact: Fact) -> Entry:
        record = fact.record()
        req_blob = resp_blob = None
        if fact.request_body is not None:
            record.request.body, req_blob = _body(fact.request_body)
        if fact.response_body is not None and record.response is not None:
            record.response.body, resp_blob = _body(fact.response_body)
        chain = self._chains.setdefault(fact.writer, Chain(ChainHead.empty(fact.writer)))
        data, head = chain.link(record)
        chain.advance(head)
        self.bodies[fact.id] = (fact.request_body, fact.response_body if record.response else None)
        return Entry(head.writer, head.seq, head.hash, data, req_blob, resp_blob, record)

    def entries(self, facts: Iterable[Fact]) -> list[Entry]:
        return [self.entry(f) for f in facts]


def many(n: int, writers: tuple[str, ...] = ("wa",), *, start: int = T0, step: int = S, ties: int = 1,
         prefix: str = "r") -> list[Fact]:
    """`n` facts spread over `writers` in turn; `ties` consecutive facts share a start time."""
    return [Fact(f"{prefix}{i:04d}", writers[i % len(writers)], start + (i // ties) * step) for i in range(n)]


def ids(records: Iterable[AuditRecord]) -> list[str]:
    return [r.id for r in records]


def newest_first(entries: Iterable[Entry]) -> list[str]:
    return [e.record.id for e in sorted(entries, key=lambda e: (e.record.started_us, e.writer, e.seq), reverse=True)]


async def walk(store: AuditStore, q: RecordQuery) -> list[list[str]]:
    """The pages of `q`, following each page's `next`, as lists of ids."""
    pages = []
    cursor = q.cursor
    while True:
        page = await store.query(RecordQuery(**{**_fields(q), "cursor": cursor}))
        pages.append(ids(page.records))
        if page.next is None:
            return pages
        assert page.records, "a page with a `next` holds records"
        cursor = page.next


def _fields(q: RecordQuery) -> dict[str, Any]:
    return {name: getattr(q, name) for name in q.__dataclass_fields__}


# --- opening -------------------------------------------------------------------------------------------------


async def test_open_is_idempotent_and_an_empty_store_answers_empty(store: AuditStore) -> None:
    await store.open()
    await store.open()
    assert await store.query(RecordQuery()) == await store.query(RecordQuery(ascending=True))
    page = await store.query(RecordQuery())
    assert (page.records, page.next) == ([], None)
    assert await store.get("r0000") is None
    assert await store.writers() == []
    assert await store.prune_markers() == {}
    assert [r async for r in store.scan(RecordQuery())] == []
    assert [r async for r in store.chain_rows("wa")] == []
    assert await store.prune_records(T0, T0) == 0
    assert await store.purge_bodies(T0, T0) == 0
    records, token = await store.changes(None)
    assert records == [] and (await store.changes(token))[0] == []


async def test_a_store_that_cannot_be_reached_raises_store_error(backend: Backend, tmp_path: Path) -> None:
    url = {"sqlite": f"sqlite:///{tmp_path}/missing/audit.db",
           "jsonl": f"jsonl:///{tmp_path}/missing/dir/logs",
           "postgres": "postgresql://postgres@127.0.0.1:9/test?schema=x"}[backend.name]
    store = open_store(url, **({"connect_timeout": 2} if backend.name == "postgres" else {}))
    with pytest.raises(StoreError):
        await store.open()
    await store.close()


# --- writing -------------------------------------------------------------------------------------------------


async def test_written_records_read_back_exactly_as_hashed_with_their_bodies(store: AuditStore) -> None:
    chains = Chains()
    facts = [Fact("r0001", "wa", T0, request_body=b'{"text": "h\xc3\xa9llo \xe2\x9c\x93"}'),
             Fact("r0002", "wa", T0 + S, request_body=b"\x00\xff\xfebinary", response_body=None),
             Fact("r0003", "wa", T0 + 2 * S, status=None, outcome="client_gone", request_body=None)]
    entries = chains.entries(facts)
    await store.write(entries)
    for entry in entries:
        got = await store.get(entry.record.id)
        assert got is not None
        assert got.canonical_bytes() == entry.canonical and got.hash == entry.hash == record_hash(entry.canonical)
        assert got.chain is not None and (got.chain.writer, got.chain.seq) == (entry.writer, entry.seq)
        assert got.purged_us is None
        request, response = chains.bodies[entry.record.id]
        assert (got.request.body.content if got.request.body else None) == request
        assert (got.response.body.content if got.response and got.response.body else None) == response


async def test_a_resent_batch_is_skipped_so_the_drain_can_retry_after_a_crash(backend: Backend) -> None:
    chains = Chains()
    entries = chains.entries(many(8))
    async with backend.open() as store:
        await store.write(entries[:5])
        await store.write(entries[:5])  # the same batch again
        await store.write(entries[3:])  # overlapping: 4 and 5 again, then 6..8
        await store.write([])
    async with backend.open() as fresh:  # another process resending after a restart
        await fresh.write(entries[2:6])
        listed = [r async for r in fresh.iter_records(RecordQuery(limit=3, ascending=True))]
        assert ids(listed) == [e.record.id for e in entries]
        assert [r.chain.seq for r in listed if r.chain] == list(range(1, 9))
        assert (await verify_store(fresh)).intact


async def test_two_store_objects_see_the_same_records(backend: Backend) -> None:
    chains = Chains()
    async with backend.open() as one, backend.open() as two:
        await one.write(chains.entries(many(3)))
        await two.write(chains.entries(many(2, prefix="s", start=T0 + 10 * S)))
        for s in (one, two):
            assert ids((await s.query(RecordQuery())).records) == ["s0001", "s0000", "r0002", "r0001", "r0000"]


# --- get -----------------------------------------------------------------------------------------------------


async def test_get_of_an_unknown_id_is_none(store: AuditStore) -> None:
    await store.write(Chains().entries(many(3)))
    for unknown in ("r9999", "", "r000", "r%", "r____", "' OR '1'='1", "r0000 "):
        assert await store.get(unknown) is None, unknown
    assert (await store.get("r0001")) is not None


# --- query: pages --------------------------------------------------------------------------------------------


async def test_pages_come_newest_first_and_cursors_neither_skip_nor_repeat(store: AuditStore) -> None:
    entries = Chains().entries(many(41, ("wa", "wb", "wc"), ties=4))  # 4 records share each start time
    await store.write(entries)
    pages = (await walk(store, RecordQuery(limit=7)))
    assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 6]
    assert [i for p in pages for i in p] == newest_first(entries)
    pages = (await walk(store, RecordQuery(limit=41)))
    assert pages == [newest_first(entries)]  # exactly one full page: no `next`
    assert [r.id async for r in store.iter_records(RecordQuery(limit=5))] == newest_first(entries)


async def test_ascending_pages_come_oldest_first(store: AuditStore) -> None:
    entries = Chains().entries(many(23, ("wa", "wb"), ties=3))
    await store.write(entries)
    pages = (await walk(store, RecordQuery(limit=4, ascending=True)))
    assert [i for p in pages for i in p] == newest_first(entries)[::-1]


async def test_a_cursor_is_a_position_so_appends_during_a_walk_change_nothing_already_listed(
        store: AuditStore) -> None:
    chains = Chains()
    original = chains.entries(many(20, ("wa", "wb"), ties=2))
    await store.write(original)
    first = await store.query(RecordQuery(limit=6))
    assert first.next == page_key(first.records[-1])
    # Newer records arrive (the sidecars keep writing) and one late-drained older one.
    await store.write(chains.entries(many(5, ("wa", "wb"), start=T0 + 100 * S, prefix="new")))
    await store.write(chains.entries([Fact("late", "wc", T0 + S // 2)]))
    seen = ids(first.records)
    cursor = first.next
    while cursor is not None:
        page = await store.query(RecordQuery(limit=6, cursor=cursor))
        seen += ids(page.records)
        cursor = page.next
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i != "late"] == newest_first(original)
    assert not [i for i in seen if i.startswith("new")]


async def test_a_page_size_is_clamped_between_one_and_max_page(store: AuditStore) -> None:
    entries = Chains().entries(many(MAX_PAGE + 3, ("wa", "wb"), ties=7))
    await store.write(entries)
    for limit in (0, -5):
        page = await store.query(RecordQuery(limit=limit))
        assert len(page.records) == 1 and page.next is not None
    big = await store.query(RecordQuery(limit=MAX_PAGE * 10))
    assert len(big.records) == MAX_PAGE and big.next is not None
    rest = await store.query(RecordQuery(limit=MAX_PAGE * 10, cursor=big.next))
    assert ids(big.records) + ids(rest.records) == newest_first(entries) and rest.next is None


async def test_pages_carry_body_content_only_when_asked(store: AuditStore) -> None:
    await store.write(Chains().entries(many(3)))
    for record in (await store.query(RecordQuery())).records:
        assert record.request.body is not None and record.request.body.size > 0
        assert record.request.body.content is None
        assert record.response is not None and record.response.body is not None
        assert record.response.body.content is None
    for record in (await store.query(RecordQuery(bodies=True))).records:
        assert record.request.body is not None and record.request.body.content == b'{"q": "refund order 42"}'
        assert record.response is not None and record.response.body is not None
        assert record.response.body.content == b'{"ok": true}'


@pytest.mark.parametrize("cursor", ["nonsense", "", "1.wa", "x.wa.1", "1.wa.y", "1.w.a.2", "1..2.3",
                                    f"{1 << 70}.wa.1", f"1.wa.{1 << 64}", f"-{1 << 70}.wa.1"])
async def test_a_malformed_cursor_is_a_store_error(store: AuditStore, cursor: str) -> None:
    await store.write(Chains().entries(many(3)))
    if cursor == "":  # no cursor at all: the first page
        assert len((await store.query(RecordQuery(cursor=cursor))).records) == 3
        return
    for ascending in (False, True):
        with pytest.raises(StoreError, match="cursor"):
            await store.query(RecordQuery(cursor=cursor, ascending=ascending))


# --- query: filters ------------------------------------------------------------------------------------------

LLM_OPENAI = {"llm": {"model": "gpt-4o-mini-2024-07-18", "request_model": "gpt-4o-mini",
                      "response_model": "gpt-4o-mini-2024-07-18", "tools": [], "tool_calls": []}}
LLM_ANTHROPIC = {"llm": {"request_model": "claude-3-5-sonnet", "response_model": "claude-3-5-sonnet-20241022",
                         "tool_calls": [{"name": "lookup_order"}, "junk", {"name": 7}]}}
LLM_OFFERED = {"llm": {"model": 4, "request_model": "gpt-4o", "tools": [{"name": "refund_order"}],
                       "tool_calls": [{"id": "no-name"}]}}
MCP_REFUND = {"mcp": {"tool": "refund_order"}}
MCP_AND_LLM = {"mcp": {"tool": "lookup_order"}, "llm": {"model": "gpt-4o", "tool_calls": [{"name": "refund_order"}]}}
ODD = {"llm": "not an object", "mcp": {"tool": ["refund_order"]}, "note": 'say "gpt-4o" and refund_order'}

FLEET = [
    Fact("r01", "wa", T0 + 1 * S, extra=LLM_OPENAI),
    Fact("r02", "wb", T0 + 2 * S, agent="billing-bot", effect="deny", outcome="refused", method="POST",
         url="https://api.stripe.com/v1/refunds?amount=50%25", status=403, rules=("no-refunds", "llm-chat")),
    Fact("r03", "wa", T0 + 3 * S, method="POST", url="https://API.Anthropic.com/v1/messages", extra=LLM_ANTHROPIC),
    Fact("r04", "wb", T0 + 3 * S, agent="billing-bot", outcome="upstream_error", url="https://billing.internal/ledger",
         status=502, extra=MCP_REFUND),
    Fact("r05", "wa", T0 + 4 * S, agent=None, effect=None, outcome="refused", url="http://example.com/a_b/c",
         status=407, request_body=None),
    Fact("r06", "wa", T0 + 5 * S, effect="hold", outcome="client_gone", method="POST",
         url="https://api.openai.com/v1/chat/completions", status=None, extra=LLM_OFFERED),
    Fact("r07", "wb", T0 + 6 * S, url="https://axb.example.com/50x/Refunds", extra=ODD),
    Fact("r08", "wa", T0 + 7 * S, agent="billing-bot", method="POST", url="https://api.openai.com/v1/responses",
         extra=MCP_AND_LLM),
    Fact("r09", "wc", T0 + 8 * S, agent="support-bot", effect="deny", outcome="refused",
         url="https://api.stripe.com/v1/charges", status=403),
    Fact("r10", "wb", T0 + 9 * S, agent="legal-bot", url="https://example.org/p\\q/Ünï?x=1",
         extra={"llm": {"model": 'ünï "q" \\ 模型'}, "mcp": {"tool": "a%_b"}}),
]

# (query, the ids it selects, oldest first): every filter alone, then combined.
FILTERS: list[tuple[str, RecordQuery, list[str]]] = [
    ("agent", RecordQuery(agent="billing-bot"), ["r02", "r04", "r08"]),
    ("agent, no match", RecordQuery(agent="Billing-Bot"), []),
    ("effect", RecordQuery(effect="deny"), ["r02", "r09"]),
    ("effect hold", RecordQuery(effect="hold"), ["r06"]),
    ("outcome", RecordQuery(outcome="refused"), ["r02", "r05", "r09"]),
    ("outcome upstream_error", RecordQuery(outcome="upstream_error"), ["r04"]),
    ("host", RecordQuery(host="api.stripe.com"), ["r02", "r09"]),
    ("host, any case", RecordQuery(host="API.ANTHROPIC.COM"), ["r03"]),
    ("host is not a substring", RecordQuery(host="stripe.com"), []),
    ("text in the url, any case", RecordQuery(text="REFUNDS"), ["r02", "r07"]),
    ("text: % is literal", RecordQuery(text="50%"), ["r02"]),
    ("text: _ is literal", RecordQuery(text="a_b"), ["r05"]),
    ("text: the id", RecordQuery(text="r04"), ["r04"]),
    ("text empty: no filter", RecordQuery(text=""), [f.id for f in FLEET]),
    ("model: model field", RecordQuery(model="gpt-4o-mini-2024-07-18"), ["r01"]),
    ("model: request_model", RecordQuery(model="gpt-4o-mini"), ["r01"]),
    ("model: response_model", RecordQuery(model="claude-3-5-sonnet-20241022"), ["r03"]),
    ("model: exact, any field", RecordQuery(model="gpt-4o"), ["r06", "r08"]),
    ("model: not a number", RecordQuery(model="4"), []),
    ("model: not a substring", RecordQuery(model="claude"), []),
    ("tool: mcp or a call", RecordQuery(tool="refund_order"), ["r04", "r08"]),
    ("tool: a model's call", RecordQuery(tool="lookup_order"), ["r03", "r08"]),
    ("tool: not a number", RecordQuery(tool="7"), []),
    ("model: quotes, backslash, non-ASCII", RecordQuery(model='ünï "q" \\ 模型'), ["r10"]),
    ("tool: % and _ are plain characters", RecordQuery(tool="a%_b"), ["r10"]),
    ("tool: exact, not a prefix", RecordQuery(tool="a%"), []),
    ("text: backslash and non-ASCII", RecordQuery(text="p\\q/Ünï"), ["r10"]),
    ("since is inclusive", RecordQuery(since_us=T0 + 7 * S), ["r08", "r09", "r10"]),
    ("until is exclusive", RecordQuery(until_us=T0 + 3 * S), ["r01", "r02"]),
    ("since and until", RecordQuery(since_us=T0 + 3 * S, until_us=T0 + 5 * S), ["r03", "r04", "r05"]),
    ("empty range", RecordQuery(since_us=T0 + 5 * S, until_us=T0 + 5 * S), []),
    ("agent and effect", RecordQuery(agent="support-bot", effect="deny"), ["r09"]),
    ("agent and tool", RecordQuery(agent="billing-bot", tool="refund_order"), ["r04", "r08"]),
    ("host and text", RecordQuery(host="api.openai.com", text="chat"), ["r06"]),
    ("model and agent and since", RecordQuery(model="gpt-4o", agent="billing-bot", since_us=T0 + 6 * S), ["r08"]),
    ("outcome and host and until", RecordQuery(outcome="refused", host="api.stripe.com", until_us=T0 + 8 * S),
     ["r02"]),
    ("all filters", RecordQuery(agent="billing-bot", effect="allow", outcome="forwarded", host="api.openai.com",
                                text="responses", model="gpt-4o", tool="lookup_order", since_us=T0 + 7 * S,
                                until_us=T0 + 7 * S + 1), ["r08"]),
    ("all but one", RecordQuery(agent="billing-bot", effect="allow", outcome="forwarded", host="api.openai.com",
                                text="responses", model="gpt-4o", tool="lookup_order", since_us=T0 + 7 * S,
                                until_us=T0 + 7 * S), []),
]


@pytest.fixture
async def fleet(store: AuditStore) -> AuditStore:
    await store.write(Chains().entries(FLEET))
    return store


async def test_every_filter_alone_and_combined_selects_exactly_its_records(fleet: AuditStore) -> None:
    for name, q, expected in FILTERS:
        assert ids((await fleet.query(q)).records) == expected[::-1], name
        assert ids((await fleet.query(RecordQuery(**{**_fields(q), "ascending": True}))).records) == expected, name


async def test_filtered_pages_follow_cursors_without_skipping(fleet: AuditStore) -> None:
    for name, q, expected in FILTERS:
        pages = (await walk(fleet, RecordQuery(**{**_fields(q), "limit": 1})))
        assert [i for p in pages for i in p] == expected[::-1], name


async def test_scan_streams_every_match_oldest_first_within_its_bounds(fleet: AuditStore) -> None:
    """`scan` ignores the query's order and cursor; here each writer's chain is in start order, so storage
    order (the JSONL store's) and oldest-first agree."""
    for name, q, expected in FILTERS:
        for limit in (1, 2, 100):
            scanned = [r.id async for r in fleet.scan(RecordQuery(**{**_fields(q), "limit": limit}))]
            assert sorted(scanned) == sorted(expected), name
    bounded = RecordQuery(since_us=T0 + 2 * S, until_us=T0 + 6 * S, limit=2, ascending=False, cursor="junk")
    scanned = [r async for r in fleet.scan(bounded)]
    assert sorted(ids(scanned)) == ["r02", "r03", "r04", "r05", "r06"]
    per_writer = [[r.chain.seq for r in scanned if r.chain and r.chain.writer == w] for w in ("wa", "wb")]
    assert all(seqs == sorted(seqs) for seqs in per_writer)
    support = [r.id async for r in fleet.scan(RecordQuery(since_us=T0 + 3 * S, agent="support-bot", limit=1))]
    assert support == ["r03", "r06", "r07", "r09"]


async def test_scan_is_oldest_first_where_the_store_can_page(fleet: AuditStore, backend: Backend) -> None:
    scanned = [r.id async for r in fleet.scan(RecordQuery(limit=2, ascending=False))]
    oldest_first = [f.id for f in sorted(FLEET, key=lambda f: (f.started_us, f.writer))]
    if backend.name == "jsonl":  # storage order (AuditStore.scan allows it): each writer's records in order
        assert sorted(scanned) == sorted(oldest_first)
        for writer in {f.writer for f in FLEET}:
            mine = [f.id for f in FLEET if f.writer == writer]
            assert [i for i in scanned if i in mine] == [i for i in oldest_first if i in mine], writer
        return
    assert scanned == oldest_first


# --- changes (tail --follow) ---------------------------------------------------------------------------------


async def test_changes_returns_what_was_stored_after_the_token_in_storage_order(store: AuditStore) -> None:
    chains = Chains()
    await store.write(chains.entries(many(4)))
    records, token = await store.changes(None)
    assert records == []  # None: only where the end is now
    later = chains.entries(many(7, start=T0 + 50 * S, prefix="n"))
    await store.write(later[:3])
    await store.write(later[3:])
    got: list[str] = []
    while True:
        records, token = await store.changes(token, limit=2)
        assert len(records) <= 2
        if not records:
            break
        got += ids(records)
    assert got == [e.record.id for e in later]
    assert (await store.changes(token)) == ([], token)


async def test_changes_follow_every_writer(store: AuditStore) -> None:
    chains = Chains()
    _, token = await store.changes(None)
    entries = chains.entries(many(9, ("wa", "wb", "wc")))
    await store.write(entries)
    records, token = await store.changes(token, limit=1000)
    assert sorted(ids(records)) == sorted(e.record.id for e in entries)
    for writer in ("wa", "wb", "wc"):
        seqs = [r.chain.seq for r in records if r.chain and r.chain.writer == writer]
        assert seqs == [1, 2, 3]
    assert (await store.changes(token))[0] == []


@pytest.mark.parametrize("token", ["nonsense", "0.5", "[1]", '{"wa": "x"}', "1e400", "{"])
async def test_a_malformed_change_token_is_a_store_error(store: AuditStore, token: str) -> None:
    await store.write(Chains().entries(many(2)))
    with pytest.raises(StoreError, match="token"):
        await store.changes(token)


async def test_a_change_token_of_another_kind_of_store_is_a_store_error_or_a_valid_position(
        backend: Backend) -> None:
    """Tokens are opaque: one from a SQL store (a number) or from a JSONL store (an object) handed to a store
    of the other kind must either be understood or be refused with StoreError, never crash."""
    async with backend.open() as store:
        await store.write(Chains().entries(many(2)))
        for token in ("0", "2", '{"wa": 1}', "{}"):
            try:
                records, _ = await store.changes(token)
            except StoreError:
                continue
            assert set(ids(records)) <= {"r0000", "r0001"}


# --- writers, chain rows, verification -----------------------------------------------------------------------


async def test_writers_lists_every_writer_with_records(store: AuditStore) -> None:
    await store.write(Chains().entries(many(7, ("wb", "wa", "wc"))))
    assert sorted(await store.writers()) == ["wa", "wb", "wc"]


async def test_chain_rows_give_each_writers_stored_records_in_seq_order(store: AuditStore) -> None:
    chains = Chains()
    entries = chains.entries(many(1203, ("wa", "wb"), ties=3))  # wa's chain is longer than a 500-row page
    await store.write(entries)
    for writer in ("wa", "wb"):
        mine = [e for e in entries if e.writer == writer]
        rows = [row async for row in store.chain_rows(writer)]
        assert [r.seq for r in rows] == [e.seq for e in mine] == list(range(1, len(mine) + 1))
        for row, entry in zip(rows, mine, strict=True):
            assert (row.canonical, row.hash, row.purged_us) == (entry.canonical, entry.hash, None)
            request = unpack(row.request_body, len(row.request_body) * 100) if row.packed and row.request_body \
                else row.request_body
            assert request == chains.bodies[entry.record.id][0]
    assert [r async for r in store.chain_rows("nobody")] == []
    report = await verify_store(store)
    assert report.intact and report.records == 1203
    assert {c.writer: (c.first_seq, c.last_seq, c.head) for c in report.chains} == {
        "wa": (1, 602, entries[-1].hash), "wb": (1, 601, entries[-2].hash)}


async def test_chain_rows_start_from_genesis(store: AuditStore) -> None:
    entries = Chains().entries(many(2))
    await store.write(entries)
    assert entries[0].record.chain is not None and entries[0].record.chain.prev == GENESIS
    rows = [r async for r in store.chain_rows("wa")]
    first = AuditRecord.from_bytes(rows[0].canonical)
    second = AuditRecord.from_bytes(rows[1].canonical)
    assert first.chain is not None and second.chain is not None
    assert (first.chain.prev, second.chain.prev) == (GENESIS, rows[0].hash)


# --- retention -----------------------------------------------------------------------------------------------

# Records are chained in the order they finish, so a long call can sit after a later-started one: wa's seq 4
# started before the cutoff but follows seq 3, which started after it. Each JSONL file holds one record here
# (`max_file_bytes=1`), so whole-file retention has record granularity; every writer's newest record is past
# the cutoff, since JSONL never touches the file a writer may still append to.
CUTOFF = T0 + 40 * S
RETAINED = [
    Fact("a1", "wa", T0 + 10 * S), Fact("a2", "wa", T0 + 20 * S), Fact("a3", "wa", T0 + 50 * S),
    Fact("a4", "wa", T0 + 30 * S), Fact("a5", "wa", T0 + 60 * S),
    Fact("b1", "wb", T0 + 15 * S), Fact("b2", "wb", T0 + 25 * S, request_body=None, response_body=None),
    Fact("b3", "wb", T0 + 35 * S), Fact("b4", "wb", T0 + 45 * S),
    Fact("c1", "wc", T0 + 41 * S), Fact("c2", "wc", T0 + 42 * S),
]


async def test_prune_deletes_each_writers_chain_prefix_started_before_the_cutoff(backend: Backend) -> None:
    entries = Chains().entries(RETAINED)
    by_id = {e.record.id: e for e in entries}
    now = T0 + 100 * S
    async with backend.open(max_file_bytes=1) if backend.name == "jsonl" else backend.open() as store:
        for e in entries:
            await store.write([e])  # one batch per record, as a sidecar drains them
        assert await store.prune_records(CUTOFF, now) == 5  # a1, a2 / b1, b2, b3 / none of wc
        survivors = [r.id async for r in store.iter_records(RecordQuery(ascending=True))]
        assert sorted(survivors) == ["a3", "a4", "a5", "b4", "c1", "c2"]
        assert await store.get("a1") is None and await store.get("a4") is not None
        markers = await store.prune_markers()
        assert set(markers) == {"wa", "wb"}
        for writer, last in (("wa", "a2"), ("wb", "b3")):
            m = markers[writer]
            assert (m.writer, m.seq, m.hash) == (writer, by_id[last].seq, by_id[last].hash)
            assert (m.ended_us, m.pruned_us) == (by_id[last].record.ended_us, now)
        assert sorted(await store.writers()) == ["wa", "wb", "wc"]
        assert await store.prune_records(CUTOFF, now + S) == 0  # nothing more to delete: markers unchanged
        assert await store.prune_markers() == markers
        report = await verify_store(store)
        assert report.intact and report.records == 6
        assert {c.writer: c.pruned_through for c in report.chains} == {"wa": 2, "wb": 3, "wc": None}


async def test_a_writer_whose_records_were_all_pruned_is_still_listed_by_its_marker(backend: Backend) -> None:
    async with backend.open() as store:
        await store.write(Chains().entries(many(3)))
        if backend.name == "jsonl":  # it never deletes a writer's newest file: here, all three records
            assert await store.prune_records(T0 + 10 * S, T0 + 20 * S) == 0
            assert await store.writers() == ["wa"] and await store.prune_markers() == {}
            assert len((await store.query(RecordQuery())).records) == 3
            assert (await verify_store(store)).intact
            return
        assert await store.prune_records(T0 + 10 * S, T0 + 20 * S) == 3
        assert await store.writers() == ["wa"] and set(await store.prune_markers()) == {"wa"}
        assert (await store.query(RecordQuery())).records == []
        assert (await verify_store(store)).intact


async def test_purge_drops_the_bodies_of_records_started_before_the_cutoff(backend: Backend) -> None:
    """A record keeps its body descriptors (sizes, digests: they are hashed) and says when its bodies went."""
    entries = Chains().entries([f for f in RETAINED if f.writer != "wa"])  # start order = chain order
    now = T0 + 100 * S
    async with backend.open(max_file_bytes=1) if backend.name == "jsonl" else backend.open() as store:
        for e in entries:
            await store.write([e])
        assert await store.purge_bodies(CUTOFF, now) == 2  # b1 and b3; b2 had no bodies to lose
        for rid in ("b1", "b2", "b3", "b4", "c1", "c2"):
            got = await store.get(rid)
            assert got is not None and got.request is not None
            purged = rid in ("b1", "b3")
            assert got.purged_us == (now if purged else None), rid
            if rid != "b2":
                assert got.request.body is not None and got.request.body.size > 0
                assert (got.request.body.content is None) is purged, rid
                assert got.response is not None and got.response.body is not None
                assert (got.response.body.content is None) is purged, rid
        assert await store.purge_bodies(CUTOFF, now + S) == 0
        report = await verify_store(store)
        assert report.intact and sum(c.bodies_purged for c in report.chains) == 4  # two bodies each


async def test_purge_also_reaches_a_record_chained_after_a_newer_one(backend: Backend) -> None:
    """Bodies go by start time, not by chain prefix: wa's seq 4 started before the cutoff, after seq 3."""
    async with backend.open() as store:
        await store.write(Chains().entries([f for f in RETAINED if f.writer == "wa"]))
        if backend.name == "jsonl":  # it strips whole closed files only: the one open file keeps its bodies
            assert await store.purge_bodies(CUTOFF, T0 + 100 * S) == 0
            records = (await store.query(RecordQuery(bodies=True))).records
            assert records and all(r.purged_us is None for r in records)
            assert (await verify_store(store)).intact
            return
        assert await store.purge_bodies(CUTOFF, T0 + 100 * S) == 3
        purged = {r.id for r in (await store.query(RecordQuery(bodies=True))).records if r.purged_us is not None}
        assert purged == {"a1", "a2", "a4"}
        assert (await verify_store(store)).intact


# --- aggregates ----------------------------------------------------------------------------------------------


async def test_stats_count_records_by_agent_effect_outcome_and_first_rule(fleet: AuditStore,
                                                                          backend: Backend) -> None:
    stats = await fleet.stats(T0 + 2 * S)
    if backend.name == "jsonl":
        assert stats is None  # cannot aggregate, and says so
        return
    assert stats is not None
    got = sorted((r.agent or "", r.effect or "", r.outcome, r.rule or "", r.count, r.last_us) for r in stats)
    assert got == sorted([
        ("billing-bot", "deny", "refused", "no-refunds", 1, T0 + 2 * S),
        ("support-bot", "allow", "forwarded", "llm-chat", 2, T0 + 6 * S),
        ("billing-bot", "allow", "upstream_error", "llm-chat", 1, T0 + 3 * S),
        ("", "", "refused", "", 1, T0 + 4 * S),
        ("support-bot", "hold", "client_gone", "llm-chat", 1, T0 + 5 * S),
        ("billing-bot", "allow", "forwarded", "llm-chat", 1, T0 + 7 * S),
        ("support-bot", "deny", "refused", "llm-chat", 1, T0 + 8 * S),
        ("legal-bot", "allow", "forwarded", "llm-chat", 1, T0 + 9 * S),
    ])


async def test_durations_are_of_the_newest_records_since(fleet: AuditStore, backend: Backend) -> None:
    durations = await fleet.durations(T0 + 5 * S, limit=3)
    if backend.name == "jsonl":
        assert durations == []  # the default: no latency figures from files
        return
    assert durations == [250_000] * 3
    assert await fleet.durations(T0 + 100 * S) == []


# --- URLs ----------------------------------------------------------------------------------------------------


def test_display_url_never_shows_a_password(tmp_path: Path) -> None:
    pg = open_store("postgresql://app:s3cret@db.example:5432/audit?schema=bastion")
    assert "s3cret" not in pg.display_url and pg.display_url.startswith("postgresql://app:***@")
    assert open_store(f"sqlite:///{tmp_path}/a.db").display_url == f"sqlite:///{tmp_path}/a.db"
    assert open_store(f"jsonl:///{tmp_path}/logs").display_url == f"jsonl:///{tmp_path}/logs"


@pytest.mark.parametrize("url", ["mysql://app:s3cret@db/x", "jsonl:///", "", "redis://127.0.0.1:6379/0",
                                 "postgresql://app:s3cret@db/x?schema=bad;name"])
def test_open_store_rejects_bad_urls_without_showing_secrets(url: str) -> None:
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert "s3cret" not in str(err.value)
