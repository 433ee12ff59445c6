"""The demo's agents and the story they play, one beat per capability of Bastion.

Every agent is an aiohttp client that goes through the proxy with its own credentials (the tokens of
`rules/examples/demo.yaml`), exactly like a real agent with `HTTP_PROXY` set. Beats run in order so the
terminal reads as a story; the held refund runs beside the rest, because without `--auto-approve` it waits for
a person for as long as it takes. Each agent prints one short line per notable outcome, taken from what
Bastion answered (status, `error.type`, its message and fields), so the lines show what an agent really sees.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from bastion.demo.upstreams import Upstreams

# The public demo tokens of rules/examples/demo.yaml (its comments name them next to each sha256).
AGENT_TOKENS = {
    "triage-bot": "triage-demo-token",
    "resolver-bot": "resolver-demo-token",
    "research-bot": "research-demo-token",
    "intern-bot": "intern-demo-token",
}
ADMIN_USER, ADMIN_TOKEN = "demo-admin", "demo-admin-token"  # roles admin and approver: the dashboard login
APPROVER_USER, APPROVER_TOKEN = "pat", "pat-demo-token"  # role approver: the scripted approver

BEAT_PAUSE = 0.4  # seconds between beats: fast enough for a 30 s run, slow enough to follow
IDLE_EVERY = 4.0  # after the story, agents read the queue this often, so the dashboard keeps moving
CALL_TIMEOUT = aiohttp.ClientTimeout(total=120)  # above the large-refunds rule's 15 s approval wait


class Narrator:
    """Prints the story: one line per notable outcome, `  12.3s  agent         text`, time since start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, who: str, text: str) -> None:
        print(f"{time.monotonic() - self.started:6.1f}s  {who:<13} {text}", flush=True)


@dataclass
class Reply:
    """What an agent got back: the status, the parsed JSON body (None if not JSON) and its text."""

    status: int
    data: Any
    text: str
    headers: Mapping[str, str]  # case-insensitive, as aiohttp gives them

    @property
    def error(self) -> dict[str, Any]:
        """Bastion's refusal, `{"type", "message", ...}`: the `error` of its LLM-style body or of its
        JSON-RPC error (MCP clients), which carry the same `type` and `message`."""
        if isinstance(self.data, dict) and isinstance(self.data.get("error"), dict):
            return self.data["error"]
        return {}

    def refusal(self) -> str:
        err = self.error
        return f"{self.status} {err.get('type', '?')}: {err.get('message', self.text[:120])}"


class Agent:
    """One simulated agent: every call goes through Bastion's proxy with the agent's credentials."""

    def __init__(self, name: str, proxy: str, session: aiohttp.ClientSession, narrator: Narrator) -> None:
        self.name = name
        self.proxy = proxy
        self.auth = aiohttp.BasicAuth(name, AGENT_TOKENS[name])
        self.session = session
        self.narrator = narrator

    def say(self, text: str) -> None:
        self.narrator.say(self.name, text)

    async def call(self, method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        async with self.session.request(method, url, json=body, headers=headers, proxy=self.proxy,
                                        proxy_auth=self.auth, timeout=CALL_TIMEOUT) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = None
            return Reply(resp.status, data, text, resp.headers.copy())


@dataclass
class Story:
    """Everything the beats share: the agents, where the upstreams and the admin listener are, and the
    run's ticket (a fresh id per run, so a reused `--home` starts with no lock, milestone or budget on it)."""

    agents: dict[str, Agent]
    up: Upstreams
    admin: str
    auto_approve: bool
    ticket: str
    narrator: Narrator

    def ticket_url(self, suffix: str = "") -> str:
        return f"{self.up.tickets}/tickets/{self.ticket}{suffix}"


# -- the beats --------------------------------------------------------------------------------------------------


async def lock_contention(s: Story) -> None:
    """Two agents want the same ticket: the second gets 423 until the first hands it off; a delete is
    refused with the rule's message; closing is refused (424) until triage records its milestone."""
    triage, resolver = s.agents["triage-bot"], s.agents["resolver-bot"]
    r = await triage.call("GET", s.ticket_url())
    triage.say(f"reads {s.ticket} -> {r.status} {(r.data or {}).get('subject', '')!r}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await resolver.call("PATCH", s.ticket_url(), {"assignee": "resolver-bot"})
    resolver.say(f"takes {s.ticket} -> {r.status}, lock ticket:{s.ticket} (fence {(r.data or {}).get('fence')})"
                 if r.status == 200 else f"takes {s.ticket} -> {r.refusal()}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await triage.call("PATCH", s.ticket_url(), {"priority": "high"})
    if r.status == 423:
        triage.say(f"wants {s.ticket} too -> 423 lock_conflict: {r.error.get('holder')} holds {r.error.get('lock')}")
    else:
        triage.say(f"wants {s.ticket} too -> {r.status}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await triage.call("DELETE", s.ticket_url())
    triage.say(f"tries to delete {s.ticket} -> {r.refusal()}" if r.status >= 400 else f"deletes -> {r.status}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await resolver.call("POST", s.ticket_url("/close"), {"resolution": "refunded"})
    if r.status == 424:
        resolver.say(f"closes {s.ticket} -> 424 dependency_pending: missing {', '.join(r.error.get('missing', []))}")
    else:
        resolver.say(f"closes {s.ticket} -> {r.status}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await resolver.call("POST", s.ticket_url("/handoff"), {"to": "triage-bot"})
    resolver.say(f"hands {s.ticket} off to triage-bot -> {r.status}, lock ticket:{s.ticket} released")
    await asyncio.sleep(BEAT_PAUSE)

    r = await triage.call("PATCH", s.ticket_url(), {"priority": "high"})
    triage.say(f"takes {s.ticket} -> {r.status}, lock ticket:{s.ticket} (fence {(r.data or {}).get('fence')}, "
               "newer than the last)" if r.status == 200 else f"takes {s.ticket} -> {r.refusal()}")
    await asyncio.sleep(BEAT_PAUSE)


async def llm_summary(s: Story) -> None:
    """A streamed chat completion through Bastion, which reads the usage chunk as it passes."""
    triage = s.agents["triage-bot"]
    body = {"model": "gpt-4.1-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Summarise ticket {s.ticket} in one line."}]}
    words: list[str] = []
    usage: dict[str, Any] = {}
    async with triage.session.post(f"{s.up.llm}/v1/chat/completions", json=body, proxy=triage.proxy,
                                   proxy_auth=triage.auth, timeout=CALL_TIMEOUT) as resp:
        if resp.status != 200:
            triage.say(f"asks the LLM -> {Reply(resp.status, None, await resp.text(), {}).refusal()}")
            return
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                words.append((choice.get("delta") or {}).get("content") or "")
    triage.say(f"LLM streamed {''.join(words).strip()!r} ({usage.get('total_tokens')} tokens: "
               f"{usage.get('prompt_tokens')} in, {usage.get('completion_tokens')} out; budget llm-tokens)")
    await asyncio.sleep(BEAT_PAUSE)


async def milestone_gate(s: Story) -> None:
    """Triage completes the milestone and hands the ticket back; closing now passes the gate."""
    triage, resolver = s.agents["triage-bot"], s.agents["resolver-bot"]
    r = await triage.call("POST", s.ticket_url("/triage"), {"priority": "high"})
    triage.say(f"triages {s.ticket} -> {r.status}, milestone triaged:{s.ticket} recorded")
    await triage.call("POST", s.ticket_url("/handoff"), {"to": "resolver-bot"})
    await asyncio.sleep(BEAT_PAUSE)
    r = await resolver.call("POST", s.ticket_url("/close"), {"resolution": "refunded"})
    resolver.say(f"closes {s.ticket} -> {r.status}, the milestone gate is open" if r.status == 200
                 else f"closes {s.ticket} -> {r.refusal()}")
    await asyncio.sleep(BEAT_PAUSE)


async def refunds(s: Story) -> None:
    """A small refund passes; a large one is held until an approver decides, then goes through once.

    Held calls wait up to the rule's `wait` (15 s) and then get 409 approval_pending: the agent re-sends the
    identical call, which joins the same approval, until someone decides."""
    resolver = s.agents["resolver-bot"]
    r = await resolver.call("POST", f"{s.up.payments}/v1/refunds", {"ticket": s.ticket, "amount": 40})
    resolver.say(f"refunds 40 -> {r.status} (under the approval threshold)")
    big = {"ticket": s.ticket, "amount": 480}
    resolver.say("refunds 480: over 100, so Bastion holds the call for an approver ...")
    started = time.monotonic()
    while True:  # re-send the identical call after each 409: it joins the same approval
        r = await resolver.call("POST", f"{s.up.payments}/v1/refunds", big)
        if r.status != 409 or r.error.get("type") != "approval_pending":
            break
    waited = time.monotonic() - started
    if r.status < 300:
        resolver.say(f"refunds 480 -> {r.status} after {waited:.1f}s on hold: approved, sent upstream once")
    else:
        resolver.say(f"refunds 480 -> {r.refusal()}")


async def mcp_tools(s: Story) -> None:
    """An MCP session through Bastion: the handshake, a listing, one tool call allowed and one refused for
    its arguments (a JSON-RPC error the MCP client shows the model)."""
    research = s.agents["research-bot"]
    url = f"{s.up.mcp}/mcp"
    headers = {"Accept": "application/json, text/event-stream"}
    r = await research.call("POST", url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "research-bot", "version": "1.0"}}}, headers)
    server = ((r.data or {}).get("result") or {}).get("serverInfo", {}).get("name", "server")
    headers = {**headers, "MCP-Protocol-Version": "2025-06-18"}
    session_id = r.headers.get("Mcp-Session-Id")
    if session_id:
        headers["Mcp-Session-Id"] = session_id
    await research.call("POST", url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    r = await research.call("POST", url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers)
    tools = [t.get("name") for t in ((r.data or {}).get("result") or {}).get("tools", [])]
    research.say(f"MCP {server}: initialize, tools/list -> {r.status}, tools {', '.join(tools)}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await research.call("POST", url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "search_kb", "arguments": {"q": "duplicate charge refund"}}}, headers)
    content = ((r.data or {}).get("result") or {}).get("content") or [{}]
    research.say(f"MCP search_kb -> {r.status}: {content[0].get('text', r.refusal())}")
    await asyncio.sleep(BEAT_PAUSE)

    r = await research.call("POST", url, {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
        "name": "query_db", "arguments": {"sql": "DROP TABLE refunds"}}}, headers)
    research.say(f"MCP query_db 'DROP TABLE refunds' -> {r.refusal()} (JSON-RPC error "
                 f"{r.error.get('code')})" if r.status >= 400 else f"MCP query_db -> {r.status}")
    await research.call("DELETE", url, None, headers)  # end the session, as MCP clients do
    await asyncio.sleep(BEAT_PAUSE)


async def runaway_loop(s: Story) -> None:
    """An agent stuck in a loop comments on the same ticket until the call budget stops it (429)."""
    intern = s.agents["intern-bot"]
    for n in range(1, 11):
        r = await intern.call("POST", s.ticket_url("/comments"), {"text": f"Any update? ({n})"})
        if r.status == 429:
            e = r.error
            intern.say(f"comment {n} -> 429 budget_exceeded: {e.get('budget')} used {e.get('used')}/"
                       f"{e.get('limit')} {e.get('unit', 'calls')}, resets at {e.get('resets_at')}")
            return
        intern.say(f"comment {n} -> {r.status}")
        await asyncio.sleep(BEAT_PAUSE / 2)
    intern.say("the comment budget never ran out (was the window just reset?)")


async def idle(s: Story) -> None:
    """After the story: quiet reads of the queue, so the dashboard's flows keep moving."""
    names = ("triage-bot", "resolver-bot", "intern-bot")
    n = 0
    while True:
        await asyncio.sleep(IDLE_EVERY)
        await s.agents[names[n % len(names)]].call("GET", f"{s.up.tickets}/tickets")
        n += 1


async def approver(s: Story, session: aiohttp.ClientSession) -> None:
    """Watch the pending approvals through the admin API. With `--auto-approve`, pat approves each one, as a
    person on the dashboard would; without it, the demo points at the dashboard page where you decide."""
    headers = {"Authorization": f"Bearer {APPROVER_TOKEN}"}
    seen: set[str] = set()
    while True:
        async with session.get(f"{s.admin}/api/approvals", params={"state": "pending"}, headers=headers) as resp:
            pending = (await resp.json()).get("approvals", []) if resp.status == 200 else []
        for a in pending:
            if a["id"] in seen:
                continue
            seen.add(a["id"])
            what = f"{a.get('agent')}: {', '.join(a.get('rules', []))} {str((a.get('preview') or {}).get('body'))[:60]}"
            if not s.auto_approve:
                s.narrator.say("demo", f"{a['id']} ({what}) waits for you: open {s.admin}/approvals/{a['id']}, "
                               f"log in with {ADMIN_TOKEN} and approve it")
                continue
            async with session.post(f"{s.admin}/api/approvals/{a['id']}/approve", headers=headers,
                                    json={"comment": "matches the duplicate charge"}) as resp:
                s.narrator.say(APPROVER_USER, f"approves {a['id']} ({what}) -> {resp.status}")
        await asyncio.sleep(0.3)


# -- the whole story ---------------------------------------------------------------------------------------------


async def _beat(narrator: Narrator, name: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run one beat; a failure is one line, never a traceback, and the story goes on."""
    try:
        await step()
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
        narrator.say("demo", f"{name} failed: {type(e).__name__}: {e}")


async def play(proxy: str, admin: str, up: Upstreams, *, auto_approve: bool, narrator: Narrator) -> None:
    """Play the story once, then keep the agents lightly busy until cancelled."""
    ticket = f"T-{1000 + secrets.randbelow(9000)}"
    # Bastion answers 127.0.0.1 directly; the proxy variables of the environment never apply (trust_env=False).
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as admin_session:
        story = Story({name: Agent(name, proxy, session, narrator) for name in AGENT_TOKENS}, up, admin,
                      auto_approve, ticket, narrator)
        background = [asyncio.create_task(_beat(narrator, "approver", lambda: approver(story, admin_session)))]
        try:
            await _beat(narrator, "lock contention", lambda: lock_contention(story))
            await _beat(narrator, "LLM", lambda: llm_summary(story))
            await _beat(narrator, "milestone", lambda: milestone_gate(story))
            refund = asyncio.create_task(_beat(narrator, "refund", lambda: refunds(story)))
            background.append(refund)
            await asyncio.sleep(BEAT_PAUSE)
            await _beat(narrator, "MCP", lambda: mcp_tools(story))
            await _beat(narrator, "budget", lambda: runaway_loop(story))
            if auto_approve:
                await refund
            narrator.say("demo", "every beat played; agents keep reading the queue (Ctrl-C to stop)")
            await _beat(narrator, "idle", lambda: idle(story))
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)


def print_line(text: str = "") -> None:
    """The banner and closing lines, without the narrator's time column."""
    print(text, file=sys.stdout, flush=True)
