"""Approval stores: the state machine as pure functions, then one behavioural suite on SQLite and a real Redis.

Two store objects on the same URL stand for two sidecars (or a sidecar and the CLI) sharing the store.
Redis tests use a key prefix unique to the test, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from lockhistory import delete_prefix
from services import require_redis

from bastion.coord import open_approval_store
from bastion.coord.approvals import (
    Approval,
    ApprovalError,
    ApprovalStore,
    HeldCall,
    admit_transition,
    decide_transition,
    fingerprint,
    may_decide,
)


def held(fp: str = "fp1", *, agent: str = "support-bot", timeout: float = 60.0, required: int = 1,
         use_within: float = 60.0, grants: bool = True, request_id: str = "req-1") -> HeldCall:
    return HeldCall(fingerprint=fp, agent=agent, owner="olga", rules=("big-refund",),
                    approvers=(("role:approver",),), required=required, timeout=timeout, use_within=use_within,
                    grants_allowed=grants, preview={"method": "POST", "url": "http://pay/refunds"},
                    request_id=request_id)


# --- fingerprints --------------------------------------------------------------------------------------------


J = "application/json"


@pytest.mark.parametrize(("a", "b", "same"), [
    (("bot", "POST", "http://x:80/r", b'{"a":1,"b":2}', J), ("bot", "POST", "http://x:80/r", b'{ "b": 2, "a": 1 }', J),
     True),
    (("bot", "POST", "http://x:80/r", b'{"a":1}', J), ("bot", "POST", "http://x:80/r", b'{"a":2}', J), False),
    (("bot", "POST", "http://x:80/r", b"x"), ("other", "POST", "http://x:80/r", b"x"), False),
    (("bot", "POST", "http://x:80/r", b"x"), ("bot", "PUT", "http://x:80/r", b"x"), False),
    (("bot", "POST", "http://x:80/r", b"x"), ("bot", "POST", "http://x:80/r?y=1", b"x"), False),
    (("bot", "POST", "http://x:80/r", b"not json {", J), ("bot", "POST", "http://x:80/r", b"not json {", J), True),
    # only a body declared as JSON is canonicalised: a form body that looks like JSON is bound byte for byte
    (("bot", "POST", "http://x:80/r", b'{"z":"&amount=1&","y":"&amount=9999&"}', "application/x-www-form-urlencoded"),
     ("bot", "POST", "http://x:80/r", b'{"y":"&amount=9999&","z":"&amount=1&"}', "application/x-www-form-urlencoded"),
     False),
    # keys equal but for case (Go merges them), and numbers that round to the same float, stay apart
    (("bot", "POST", "http://x:80/r", b'{"amount":1,"AMOUNT":9}', J),
     ("bot", "POST", "http://x:80/r", b'{"AMOUNT":9,"amount":1}', J), False),
    (("bot", "POST", "http://x:80/r", b'{"n":1e400}', J),
     ("bot", "POST", "http://x:80/r", b'{"n":Infinity}', J), False),
    (("bot", "POST", "http://x:80/r", b'{"n":9007199254740993.0}', J),
     ("bot", "POST", "http://x:80/r", b'{"n":9007199254740992.0}', J), False),
    (("bot", "POST", "http://x:80/r", b'{"s":"\\ud800"}', J), ("bot", "POST", "http://x:80/r", b'{"s":"x"}', J), False),
], ids=["json-key-order", "json-value", "agent", "method", "query", "raw-body", "form-not-json", "key-case",
        "huge-number", "float-precision", "lone-surrogate"])
def test_fingerprint_binds_the_exact_call(a: tuple, b: tuple, same: bool) -> None:
    assert (fingerprint(*a) == fingerprint(*b)) is same


MINE = ("Authorization", "Bearer mine")


@pytest.mark.parametrize(("headers", "same"), [
    ([("Authorization", "Bearer other-account")], False),
    ([MINE, ("Stripe-Account", "acct_VICTIM")], False),
    ([MINE, ("X-Vault-Token", "root")], False),
    ([MINE, ("Cookie", "session=other")], False),
    ([MINE, ("X-HTTP-Method-Override", "DELETE")], False),
    ([MINE, ("Content-Encoding", "gzip")], False),
    ([MINE, ("X-Request-Id", "retry-2"), ("X-Stainless-Retry-Count", "1"), ("Idempotency-Key", "k2"),
      ("traceparent", "00-abc-def-01"), ("User-Agent", "curl/8")], True),
    ([("authorization", "Bearer mine")], True),
], ids=["other-credentials", "on-behalf-of", "vault-token", "other-cookie", "method-override", "encoding",
        "tracing-headers", "name-case"])
def test_headers_that_change_the_call_are_bound(headers: list[tuple[str, str]], same: bool) -> None:
    """The first call sent only `Authorization: Bearer mine`; is the second (with `headers`) the same call?"""
    base = ("bot", "POST", "http://x:80/r", b"{}", "application/json")
    assert (fingerprint(*base, headers) == fingerprint(*base, [MINE])) is same


# --- the state machine, pure ---------------------------------------------------------------------------------


def test_first_call_opens_and_retries_join() -> None:
    first, adm = admit_transition(None, held(), 1000.0)
    assert adm.verdict == "wait" and adm.created and first is not None and first.state == "pending"
    again, adm2 = admit_transition(first, held(request_id="req-2"), 1001.0)
    assert adm2.verdict == "wait" and not adm2.created and again is not None
    assert again.id == first.id and again.joins == 1


def test_approved_passes_once_then_a_new_approval_is_needed() -> None:
    a, _ = admit_transition(None, held(), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", "approve", "ok", 1001.0)
    used, adm = admit_transition(a, held(request_id="req-2"), 1002.0)
    assert adm.verdict == "pass" and used is not None and used.state == "executed"
    assert used.executed_request_id == "req-2"
    fresh, adm = admit_transition(used, held(request_id="req-3"), 1003.0)
    assert adm.verdict == "wait" and adm.created and fresh is not None and fresh.id != a.id


def test_denial_answers_resends_and_grants_do_not_override_it() -> None:
    a, _ = admit_transition(None, held(), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", "deny", "too large", 1001.0)
    grant = object()
    _, adm = admit_transition(a, held(), 1002.0, grant)  # type: ignore[arg-type]
    assert adm.verdict == "denied" and adm.approval is not None and adm.approval.note == "too large"
    _, later = admit_transition(a, held(), 1001.0 + 61.0)  # past deny_for (= timeout): ask again
    assert later.verdict == "wait" and later.created


def test_expiry_is_told_once_then_the_call_asks_again() -> None:
    a, _ = admit_transition(None, held(timeout=10), 1000.0)
    assert a is not None
    told, adm = admit_transition(a, held(), 1011.0)
    assert adm.verdict == "expired" and told is not None and told.state == "expired"
    _, again = admit_transition(told, held(), 1012.0)
    assert again.verdict == "wait" and again.created


def test_approved_but_unused_lapses() -> None:
    a, _ = admit_transition(None, held(use_within=5), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", "approve", None, 1001.0)
    assert a.current(1007.0).state == "lapsed"
    _, adm = admit_transition(a, held(), 1007.0)
    assert adm.verdict == "wait" and adm.created


@pytest.mark.parametrize(("first", "second"), [("approve", "approve"), ("approve", "deny"), ("deny", "approve")])
def test_first_decision_wins(first: str, second: str) -> None:
    a, _ = admit_transition(None, held(), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", first, None, 1001.0)  # type: ignore[arg-type]
    with pytest.raises(ApprovalError) as e:
        decide_transition(a, "carol", second, None, 1002.0)  # type: ignore[arg-type]
    assert e.value.status == 409 and f"already {a.state}" in str(e.value)


def test_two_approvers_needed_and_any_deny_is_final() -> None:
    a, _ = admit_transition(None, held(required=2), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", "approve", None, 1001.0)
    assert a.state == "pending" and a.approvals_given == 1
    with pytest.raises(ApprovalError, match="already approved"):
        decide_transition(a, "alice", "approve", None, 1002.0)
    denied = decide_transition(a, "carol", "deny", "no", 1002.0)
    assert denied.state == "denied"
    approved = decide_transition(a, "carol", "approve", None, 1002.0)
    assert approved.state == "approved" and approved.decided_by == "carol"


def test_who_may_decide() -> None:
    a, _ = admit_transition(None, held(), 1000.0)
    assert a is not None
    assert may_decide(a, "alice", frozenset({"approver"})) is None
    assert "lacks" in (may_decide(a, "bob", frozenset({"viewer"})) or "")
    assert "owns agent" in (may_decide(a, "olga", frozenset({"approver"})) or "")
    two_groups = replace(a, approvers=[["role:approver"], ["role:finance"]])
    assert may_decide(two_groups, "alice", frozenset({"approver"})) is not None
    assert may_decide(two_groups, "alice", frozenset({"approver", "finance"})) is None


def test_record_round_trips() -> None:
    a, _ = admit_transition(None, held(), 1000.0)
    assert a is not None
    a = decide_transition(a, "alice", "approve", "fine", 1001.0, grant_for=60)
    assert Approval.from_doc(a.to_doc()) == a
    assert a.to_json(1002.0)["grant"]["by"] == "alice"


# --- the stores, both backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    url: str
    prefix: str

    def open(self) -> ApprovalStore:
        return open_approval_store(self.url, key_prefix=self.prefix or None)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield Backend(f"sqlite:///{tmp_path / 'bastion.db'}", "")
        return
    url = require_redis()
    prefix = f"bastiontest:{uuid.uuid4().hex}:"
    yield Backend(url, prefix)
    delete_prefix(url, prefix)


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[tuple[ApprovalStore, ApprovalStore]]:
    one, two = backend.open(), backend.open()
    yield one, two
    await one.close()
    await two.close()


async def test_concurrent_retries_make_one_approval(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    results = await asyncio.gather(*(s.admit(held(request_id=f"r{i}")) for i, s in enumerate([one, two] * 10)))
    ids = {r.approval.id for r in results if r.approval is not None}
    assert len(ids) == 1 and sum(r.created for r in results) == 1
    [pending] = await one.list("pending")
    assert pending.joins == 19 and await two.count_pending() == 1


async def test_decision_in_one_store_is_seen_and_consumed_once_in_the_other(
        stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    adm = await one.admit(held())
    assert adm.approval is not None
    decided = await two.decide(adm.approval.id, "alice", "approve", "go ahead")
    assert decided.state == "approved" and decided.note == "go ahead"
    seen = await one.get_many([adm.approval.id, "apr_missing"])
    assert list(seen) == [adm.approval.id] and seen[adm.approval.id].state == "approved"
    winners = await asyncio.gather(*(s.consume(adm.approval.id, f"r{i}") for i, s in enumerate([one, two] * 3)))
    assert sum(w is not None for w in winners) == 1
    after = await two.get(adm.approval.id)
    assert after is not None and after.state == "executed"
    with pytest.raises(ApprovalError) as e:
        await one.decide(adm.approval.id, "carol", "deny", "late")
    assert e.value.status == 409


async def test_unknown_approval_is_404(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    well_formed = "apr_" + "0" * 20
    for store in stores:
        assert await store.get(well_formed) is None
        with pytest.raises(ApprovalError) as e:
            await store.decide(well_formed, "alice", "approve")
        assert e.value.status == 404
        with pytest.raises(ApprovalError) as e:
            await store.cancel(well_formed, "alice")
        assert e.value.status == 404


async def test_grants_pass_the_same_agent_and_rule_only_and_can_be_revoked(
        stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    adm = await one.admit(held())
    assert adm.approval is not None
    decided = await two.decide(adm.approval.id, "alice", "approve", None, grant_for=60)
    assert decided.grant is not None
    granted = await one.admit(held("fp-other-call"))
    assert granted.verdict == "granted" and granted.grant is not None and granted.grant.by == "alice"
    other_agent = await one.admit(held("fp-other-agent", agent="billing-bot"))
    assert other_agent.verdict == "wait"
    [listed] = await two.list_grants()
    assert listed.id == decided.grant["id"]
    assert await two.revoke_grant(listed.id) is not None
    assert (await one.admit(held("fp-after-revoke"))).verdict == "wait"


async def test_grant_refused_where_the_rule_needs_several_approvers(
        stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    adm = await stores[0].admit(held(required=2))
    assert adm.approval is not None
    with pytest.raises(ApprovalError) as e:
        await stores[1].decide(adm.approval.id, "alice", "approve", grant_for=60)
    assert e.value.status == 400


async def test_listing_by_state_follows_time(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    adm = await one.admit(held(timeout=0.2))
    assert adm.approval is not None
    assert [a.id for a in await two.list("pending")] == [adm.approval.id]
    await asyncio.sleep(0.3)
    assert await two.list("pending") == []
    assert [a.id for a in await two.list("expired")] == [adm.approval.id]
    told = await one.report_expiry(adm.approval.id)
    assert told is not None and told.state == "expired" and told.expiry_reported
    assert (await two.admit(held())).created  # the next re-send asks again


async def test_cancel(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    adm = await stores[0].admit(held())
    assert adm.approval is not None
    cancelled = await stores[1].cancel(adm.approval.id, "alice", "wrong ticket")
    assert cancelled.state == "cancelled"
    assert (await stores[0].admit(held())).created



def test_a_duplicated_json_key_is_never_the_same_call_as_either_value() -> None:
    ambiguous = fingerprint("bot", "POST", "http://x:80/r", b'{"amount": 1, "amount": 9000}', J)
    assert ambiguous != fingerprint("bot", "POST", "http://x:80/r", b'{"amount": 9000}', J)
    assert ambiguous != fingerprint("bot", "POST", "http://x:80/r", b'{"amount": 1}', J)


def test_stricter_rules_or_approvers_need_their_own_approval() -> None:
    call = ("bot", "POST", "http://x:80/r", b"{}", J, [("Authorization", "Bearer mine")])
    loose = fingerprint(*call, [["pay"], [["role:approver"]], 1])
    assert loose != fingerprint(*call, [["pay", "pay-gold"], [["role:approver"], ["role:finance"]], 2])
    assert loose != fingerprint(*call, [["pay"], [["role:finance"]], 1])  # a reload tightened the approvers
    assert loose == fingerprint(*call, [["pay"], [["role:approver"]], 1])


def test_an_agent_over_its_rate_may_join_but_not_open() -> None:
    first, _ = admit_transition(None, held(), 1000.0)
    _, joined = admit_transition(first, held(request_id="r2"), 1001.0, may_open=False)
    assert joined.verdict == "wait" and not joined.created
    _, refused = admit_transition(None, held("another-call"), 1001.0, may_open=False)
    assert refused.verdict == "throttled" and refused.approval is None


@pytest.mark.parametrize("bad", ["", "apr_", "apr_zz", "apr_" + "0" * 21, "grt_" + "0" * 20, "../apr_x", "apr_%00"])
async def test_ids_that_no_approval_can_have_are_refused_before_the_store(tmp_path: Path, bad: str) -> None:
    store = open_approval_store(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert await store.get(bad) is None
        with pytest.raises(ApprovalError) as e:
            await store.decide(bad, "alice", "approve")
        assert e.value.status == 404
        assert await store.revoke_grant(bad) is None
    finally:
        await store.close()


def test_webhook_text_cannot_forge_links_or_leave_its_code_span() -> None:
    from bastion.coord.notify import payload

    a, _ = admit_transition(None, replace(held(), preview={
        "method": "POST", "url": "http://x/a?<https://evil.example|click here>`*bold*`", "body": "secret"}), 1.0)
    assert a is not None
    doc = payload("pending", a, "https://bastion.example.com/approvals/" + a.id)
    assert "<https://evil" not in doc["text"] and "&lt;https://evil.example|click here&gt;" in doc["text"]
    assert doc["text"].count("`") == 2 and "secret" not in json.dumps(doc)
    assert doc["url"] == "http://x/a?<https://evil.example|click here>`*bold*`"  # plain for programs


def test_cli_output_shows_control_characters_escaped() -> None:
    from bastion.coord.approval_commands import safe

    assert safe("ok\x1b[2K\rforged") == "ok\\x1b[2K\\x0dforged"
    assert safe("line\nnext\x07", keep_newlines=True) == "line\nnext\\x07"


async def test_a_denial_suspends_the_agents_grants_for_that_rule_and_a_cancel_ends_its_own(
        stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    first = await one.admit(held("granted-call"))
    assert first.approval is not None
    granted = await two.decide(first.approval.id, "alice", "approve", None, grant_for=600)
    assert granted.grant is not None and len(await one.list_grants()) == 1
    other = await one.admit(held("other-call", agent="billing-bot"))  # another agent: no grant
    assert other.approval is not None
    await two.decide(other.approval.id, "alice", "deny", "no")
    assert len(await one.list_grants()) == 1  # billing-bot's denial leaves support-bot's grant alone
    pending = await one.admit(held("variant", required=2))  # required > 1: not passed by the grant
    assert pending.approval is not None
    await two.decide(pending.approval.id, "carol", "deny", "not this one")
    assert await one.list_grants() == []  # support-bot's denial ended its grant for the rule
    again = await one.admit(held("again"))
    assert again.verdict == "wait"
    second = await two.decide(again.approval.id, "alice", "approve", None, grant_for=600)  # type: ignore[union-attr]
    assert second.grant is not None
    await two.cancel(second.id, "carol", "wrong batch")
    assert await one.list_grants() == []


async def test_an_approval_given_back_passes_the_next_resend(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    adm = await one.admit(held())
    assert adm.approval is not None
    await two.decide(adm.approval.id, "alice", "approve")
    used = await one.admit(held(request_id="r-used"))
    assert used.verdict == "pass"
    assert not await one.give_back(adm.approval.id, "r-someone-else")
    assert await one.give_back(adm.approval.id, "r-used")
    again = await two.admit(held(request_id="r-again"))
    assert again.verdict == "pass" and again.approval is not None and again.approval.id == adm.approval.id


async def test_polling_and_counting_skip_expired_approvals(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    live = await one.admit(held("live", timeout=60))
    stale = [await one.admit(held(f"stale-{i}", timeout=0.1)) for i in range(5)]
    await asyncio.sleep(0.3)
    assert live.approval is not None
    ids = [live.approval.id, *(s.approval.id for s in stale if s.approval is not None)]
    assert set(await two.decided(ids)) == set(ids[1:])  # only the expired ones need a look
    assert await two.count_pending() == 1
    assert [a.id for a in await two.list("pending", 1)] == [live.approval.id]  # not hidden by newer stale ones
    await two.decide(live.approval.id, "alice", "approve")
    assert live.approval.id in await one.decided(ids)
