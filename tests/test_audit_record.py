"""The audit record: ids, JSON round trip, canonical encoding, and rejection of malformed stored JSON."""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest

from bastion.audit.chain import GENESIS, Chain, ChainHead, record_hash
from bastion.audit.record import (
    ApprovalFact,
    AuditRecord,
    Body,
    DecisionFacts,
    ErrorFacts,
    Identity,
    LockFact,
    RecordError,
    Request,
    Response,
    Timings,
    canonical,
    hashed_form,
)
from bastion.ids import new_request_id
from bastion.policy.decision import Decision


def full_record() -> AuditRecord:
    """A record with every optional part filled, as a held-then-approved call with a lock would have."""
    return AuditRecord(
        id=new_request_id(), started_us=1_795_513_287_481_246, ended_us=1_795_513_287_933_102,
        identity=Identity("billing-bot", "basic", "127.0.0.1:50000"),
        request=Request("POST", "https://payments.example.com/v1/refunds?x=1", "HTTP/2.0",
                        [("content-type", "application/json"), ("x-dup", "a"), ("x-dup", "b")],
                        Body(size=20, sha256="ab" * 32, mime_type="application/json", stored=20,
                             stored_sha256="cd" * 32, content=b'{"amount": 9000.5}\n')),
        response=Response(201, "Created", "HTTP/2.0", [("content-type", "application/json")],
                          Body(size=3, sha256=None, stored=3, stored_sha256="ef" * 32, content=b"\xff\x00\x01"),
                          streamed=True),
        outcome="forwarded",
        timings=Timings(total_us=451_856, decision_us=41, upstream_us=380_000),
        decision=DecisionFacts("hold", "hold", "enforce", ["big-refund"], errors=["json.amount: not a number"]),
        locks=[LockFact("ticket:42", "acquired", rule="ticket-reply", fence=1795513287188547, expires_us=9)],
        approval=ApprovalFact("apr_1", "approved", decided_by="alice", note="ok, known customer", waited_us=12),
        policy_revision="f" * 64, upstream="10.0.0.5:443", redactions=["/request/headers/authorization"],
        extra={"llm": {"model": "gpt-4o-mini", "input_tokens": 12, "ratio": 0.25}, "unicode": "naïve ✓"},
    )


def test_request_ids_are_uuid7_unique_and_sort_in_creation_order() -> None:
    ids = [new_request_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # monotonic within a process, even inside one millisecond
    for rid in ids[:50]:
        u = uuid.UUID(rid)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid)


def test_request_ids_from_many_threads_never_collide() -> None:
    out: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        mine = [new_request_id() for _ in range(2000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 8000


def test_json_round_trip_keeps_every_field_and_body_content() -> None:
    rec = full_record()
    rec.hash = "1" * 64
    data = json.loads(json.dumps(rec.to_json(with_content=True, with_hash=True)))
    back = AuditRecord.from_json(data)
    assert back == rec  # dataclass equality ignores content: compare it separately
    assert back.request.body is not None and back.request.body.content == b'{"amount": 9000.5}\n'
    assert back.response is not None and back.response.body is not None
    assert back.response.body.content == b"\xff\x00\x01"  # binary survives as base64
    assert data["response"]["body"]["content"] == {"base64": "/wAB"}
    assert back.hash == "1" * 64


def test_canonical_form_is_sorted_compact_and_excludes_hash_and_content() -> None:
    rec = full_record()
    rec.hash = "2" * 64
    plain = rec.canonical_bytes()
    assert plain == canonical(json.loads(plain))
    assert plain == json.dumps(json.loads(plain), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert b'"hash"' not in plain and b'"content"' not in plain
    exported = rec.to_json(with_content=True, with_hash=True)
    assert canonical(hashed_form(exported)) == plain
    assert "naïve ✓".encode() in plain  # UTF-8, not \\u escapes


def test_decision_facts_from_policy_decision() -> None:
    d = Decision(effect="allow", would_effect="deny", mode="report", agent="a", rules=("r1", "r2"),
                 reason="rule", message="nope", errors=("e",))
    facts = DecisionFacts.from_decision(d)
    assert facts.to_json() == {"effect": "allow", "would_effect": "deny", "mode": "report", "rules": ["r1", "r2"],
                               "reason": "rule", "message": "nope", "errors": ["e"]}


def test_chain_links_records_and_hash_covers_the_link() -> None:
    chain = Chain(ChainHead.empty("w1"))
    hashes = []
    for _ in range(3):
        rec = full_record()
        data, head = chain.link(rec)
        chain.advance(head)
        assert record_hash(data) == rec.hash == head.hash
        hashes.append(rec.hash)
        assert rec.chain is not None
    assert rec.chain.seq == 3 and rec.chain.prev == hashes[1]
    first = full_record()
    Chain(ChainHead.empty("w1")).link(first)
    assert first.chain is not None and first.chain.prev == GENESIS and first.chain.seq == 1


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("id"),
    lambda d: d.update(schema="other/9"),
    lambda d: d.update(outcome="exploded"),
    lambda d: d.update(started_us="yesterday"),
    lambda d: d.update(started_us=True),
    lambda d: d["request"].update(headers=[{"name": "x"}]),
    lambda d: d["identity"].pop("auth"),
    lambda d: d.update(redactions=[1, 2]),
    lambda d: d["response"]["body"].update(content={"base64": "***"}),
])
def test_malformed_records_raise_record_error(mutate: object) -> None:
    data = full_record().to_json(with_content=True)
    mutate(data)  # type: ignore[operator]
    with pytest.raises(RecordError):
        AuditRecord.from_json(data)


def test_from_bytes_rejects_non_objects() -> None:
    for raw in (b"[]", b"not json", b"\xff"):
        with pytest.raises(RecordError):
            AuditRecord.from_bytes(raw)


def test_minimal_refusal_record_round_trips() -> None:
    rec = AuditRecord(id=new_request_id(), started_us=1, ended_us=2, identity=Identity(None, "missing", "[::1]:9"),
                      request=Request("GET", "http://example.com/"), outcome="refused",
                      timings=Timings(total_us=1), response=Response(407, "Proxy Authentication Required",
                                                                      source="bastion"),
                      error=ErrorFacts("proxy_auth_required", "no credentials"))
    assert AuditRecord.from_bytes(rec.canonical_bytes()) == rec
