"""SQL shared by the SQLite and PostgreSQL stores: one table layout, one query builder, two placeholder styles.

Layout (`<prefix>records`): the canonical record JSON exactly as hashed (`record`, TEXT, so it is readable
with the database's JSON functions), its `hash`, the chain key (`writer`, `seq`, unique), copies of a few
fields for searching (`index_of`; `verify` checks they agree with the JSON), the zlib-packed bodies, and
`purged_us` once retention dropped them. `ingest` numbers rows in arrival order for `tail --follow`.
`<prefix>prune` holds one prune marker per writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.audit.bodies import DecodeError, unpack
from bastion.audit.entry import Entry
from bastion.audit.record import AuditRecord, Body, canonical
from bastion.audit.sinks.base import MAX_PAGE, RecordQuery, index_of, parse_page_key

log = logging.getLogger("bastion.audit")

INDEX_COLUMNS = ("id", "started_us", "ended_us", "agent", "method", "host", "url", "status", "effect", "outcome")
INSERT_COLUMNS = ("writer", "seq", *INDEX_COLUMNS, "record", "hash", "request_body", "response_body")
READ_COLUMNS = "writer, seq, record, hash, request_body, response_body, purged_us"


class Params:
    """Collects query arguments and hands out placeholders: `?` (SQLite) or `$n` (PostgreSQL)."""

    def __init__(self, numbered: bool) -> None:
        self.numbered = numbered
        self.args: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}" if self.numbered else "?"


def entry_row(entry: Entry) -> tuple[Any, ...]:
    idx = index_of(entry.record)
    return (entry.writer, entry.seq, *(idx[c] for c in INDEX_COLUMNS), entry.canonical.decode("utf-8"),
            entry.hash, entry.request_body, entry.response_body)


# The `model` and `tool` filters below put only placeholders into the SQL; the values are bound parameters.
#
# Each starts with a substring test on the stored text (`instr`, `strpos`): the record column holds the
# canonical JSON, so a record that holds the name as a value contains the name as canonical JSON writes it
# (`_needle`), and one that does not contain it is passed over without being parsed, which costs a fraction
# of the parse (PostgreSQL: about 6 µs instead of 100 µs per record of 2.5 KB).

def _needle(name: str) -> str:
    """`name` as it appears inside the canonical JSON: between the quotes of its JSON string."""
    return canonical(name).decode("utf-8")[1:-1]


def _sqlite_model(p: Params, model: str) -> str:
    near, value = p(_needle(model)), p(model)
    return (f"(instr(record, {near}) > 0 AND {value} IN (json_extract(record, '$.extra.llm.model'), "
            "json_extract(record, '$.extra.llm.request_model'), json_extract(record, '$.extra.llm.response_model')))")


def _sqlite_tool(p: Params, tool: str) -> str:
    # CASE, not AND: SQLite may test conditions in any order, and json_extract on an element that is not JSON
    # (a malformed record) would fail the whole query; CASE reads `name` only from objects.
    near, mcp, call = p(_needle(tool)), p(tool), p(tool)
    return (f"(instr(record, {near}) > 0 AND (json_extract(record, '$.extra.mcp.tool') = {mcp} "  # noqa: S608
            "OR EXISTS (SELECT 1 FROM json_each(record, '$.extra.llm.tool_calls') AS item "
            f"WHERE CASE WHEN item.type = 'object' THEN json_extract(item.value, '$.name') END = {call})))")


def _postgres_model(p: Params, model: str) -> str:
    # jsonb equality with a jsonb string: exact, and never true for a number that prints the same. The record
    # is parsed once per row (the subquery), not once per path.
    near, value = p(_needle(model)), p(model)
    return (f"(strpos(record, {near}) > 0 AND (SELECT to_jsonb({value}::text) IN "  # noqa: S608
            "(d #> '{extra,llm,model}', d #> '{extra,llm,request_model}', d #> '{extra,llm,response_model}') "
            "FROM (SELECT record::jsonb) AS j(d)))")


def _postgres_tool(p: Params, tool: str) -> str:
    near, value = p(_needle(tool)), p(tool)
    calls = "d #> '{extra,llm,tool_calls}'"
    return (f"(strpos(record, {near}) > 0 AND (SELECT d #> '{{extra,mcp,tool}}' = v OR EXISTS "  # noqa: S608
            f"(SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof({calls}) = 'array' THEN {calls} END) "
            "AS c(item) WHERE jsonb_typeof(item) = 'object' AND item -> 'name' = v) "
            f"FROM (SELECT record::jsonb, to_jsonb({value}::text)) AS j(d, v)))")


@dataclass(frozen=True, slots=True)
class JsonFilters:
    """How a dialect tests the `model` and `tool` filters inside the record JSON (see `RecordQuery`): no
    column, no index; a substring test, then one JSON evaluation, per record the index walk reaches."""

    model: Callable[[Params, str], str]
    tool: Callable[[Params, str], str]


SQLITE_JSON = JsonFilters(_sqlite_model, _sqlite_tool)
POSTGRES_JSON = JsonFilters(_postgres_model, _postgres_tool)


def select_records(table: str, q: RecordQuery, p: Params, *, ilike: bool = False,
                   json_filters: JsonFilters = SQLITE_JSON) -> str:
    where: list[str] = []
    if q.agent is not None:
        where.append(f"agent = {p(q.agent)}")
    if q.effect is not None:
        where.append(f"effect = {p(q.effect)}")
    if q.outcome is not None:
        where.append(f"outcome = {p(q.outcome)}")
    if q.host is not None:
        where.append(f"host = {p(q.host.lower())}")
    if q.text:
        escaped = q.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = "ILIKE" if ilike else "LIKE"
        where.append(f"(url {like} {p('%' + escaped + '%')} ESCAPE '\\' OR id = {p(q.text)})")
    if q.model is not None:
        where.append(json_filters.model(p, q.model))
    if q.tool is not None:
        where.append(json_filters.tool(p, q.tool))
    if q.since_us is not None:
        where.append(f"started_us >= {p(q.since_us)}")
    if q.until_us is not None:
        where.append(f"started_us < {p(q.until_us)}")
    if q.cursor:
        started, writer, seq = parse_page_key(q.cursor)
        op = ">" if q.ascending else "<"
        where.append(f"(started_us, writer, seq) {op} ({p(started)}, {p(writer)}, {p(seq)})")
    order = "ASC" if q.ascending else "DESC"
    cols = READ_COLUMNS if q.bodies else "writer, seq, record, hash, NULL, NULL, purged_us"
    limit = max(1, min(q.limit, MAX_PAGE))
    # Identifiers are constants or validated names; every value is a bound parameter.
    return (f"SELECT {cols} FROM {table} {'WHERE ' + ' AND '.join(where) if where else ''} "  # noqa: S608
            f"ORDER BY started_us {order}, writer {order}, seq {order} LIMIT {p(limit + 1)}")


FILTER_INDEXES = (("effect", "effect"), ("outcome", "outcome"), ("host", "host"), ("agent_seq", "agent"))
"""Indexes `(column, started_us, writer, seq)` for every flow filter, so a filtered page walks its own index
newest first and stops after one page, however many records the store holds."""


def filter_index_ddl(table: str, prefix: str = "") -> list[str]:
    return [f"CREATE INDEX IF NOT EXISTS {prefix}audit_records_{name} ON {table} ({column}, started_us, writer, seq)"
            for name, column in FILTER_INDEXES]


def select_stats(table: str, since: str, rule_expr: str) -> str:
    return (f"SELECT agent, effect, outcome, {rule_expr} AS rule, COUNT(*), MAX(started_us) FROM {table} "  # noqa: S608
            f"WHERE started_us >= {since} GROUP BY agent, effect, outcome, rule")


def select_durations(table: str, since: str, limit: str) -> str:
    return (f"SELECT ended_us - started_us FROM {table} WHERE started_us >= {since} "  # noqa: S608
            f"ORDER BY started_us DESC LIMIT {limit}")


def row_record(row: Sequence[Any]) -> AuditRecord:
    """A record from a (writer, seq, record, hash, request_body, response_body, purged_us) row."""
    record = AuditRecord.from_bytes(row[2])
    record.hash = row[3]
    record.purged_us = row[6]
    _attach(record.request.body, row[4], record.id)
    if record.response is not None:
        _attach(record.response.body, row[5], record.id)
    return record


def _attach(body: Body | None, blob: bytes | None, record_id: str) -> None:
    if body is None or blob is None:
        return
    try:
        body.content = unpack(bytes(blob), body.stored)
    except DecodeError as e:
        log.warning("audit record %s: stored body unreadable: %s", record_id, e)
