"""What the traffic means: LLM calls and MCP tool calls as facts for the audit record and the metrics.

A pipeline stage after the gate and before the audit capture. For a request the rules saw, it asks the same
request facts (`RequestFacts.llm()`, `.mcp()`: parsed once, shared with the policy) what call it is, and
puts the request's part into `flow.metadata[flowmeta.TRAFFIC]` at once, so a refused call's record names the
model or tool too. For a forwarded call it then reads the answer:

- streamed (the gate chose to stream: event streams, unknown or large length): an observer is chained into
  `flow.response.stream`. It sees every chunk on its way to the agent and never holds one back: parsing is
  incremental (SSE events; usage, tool calls and finish reasons from the events that carry them) and the
  chunk is passed on unchanged. The audit's tap, placed after, calls it first.
- buffered: the whole body is parsed at `response` (decoded from its Content-Encoding under a bound).

When the exchange ends (`response`, or `error` when the agent left mid-stream, with what was seen so far) the
facts are completed and the metrics counted: `bastion_llm_tokens_total{agent,model,kind}`,
`bastion_llm_time_to_first_token_seconds{model}`, `bastion_mcp_calls_total{agent,method,tool,outcome}`.
Model and tool labels come from agents and upstreams, so they are bounded (`BoundedLabel`).

`--response-facts off` (`BASTION_RESPONSE_FACTS=off`) leaves answers unread: request facts (and so rules on
`llm` and `mcp`) still work, token metrics and response facts do not.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from bastion import metrics
from bastion.audit.bodies import DecodeError, decode_content
from bastion.policy.facts import EvalError, RequestFacts
from bastion.protocols.llm import LlmRequest, LlmResponseObserver, usage_tokens
from bastion.protocols.mcp import McpProblem, McpRequest, McpResponseObserver
from bastion.proxy import flowmeta

log = logging.getLogger("bastion.proxy")

BODY_LIMIT = 16 << 20
"""Decoded bytes of a buffered answer read for its facts; the observers bound what they parse further."""

_STATE = "bastion.traffic.state"


class BoundedLabel:
    """Metric label values that come from outside (model and tool names): the first `limit` distinct values
    are kept (cut to `width` characters), later ones are counted as "other", so a hostile agent or upstream
    cannot grow `/metrics` without bound."""

    OTHER = "other"

    def __init__(self, limit: int = 100, width: int = 80) -> None:
        self.limit = limit
        self.width = width
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if not value:
            return "unknown"
        value = value[: self.width]
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self.limit:
                return self.OTHER
            self._seen.add(value)
        return value


@dataclass(slots=True)
class _Observation:
    llm: LlmRequest | None
    mcp: McpRequest | None
    llm_observer: LlmResponseObserver | None = None
    mcp_observer: McpResponseObserver | None = None
    streamed: bool = False
    done: bool = False


class _Inflate:
    """Incremental gzip/deflate for a compressed event stream, under a budget: a stream may inflate to at most
    `RATIO` times what arrived plus `ALLOWANCE`, so a hostile upstream's small, highly compressed chunks cannot
    make the observer parse megabytes on the event loop. At the budget (or on corrupt data) reading stops and
    the rest of the answer passes on unread: its facts then lack what came later, but nothing is misread."""

    RATIO = 64
    ALLOWANCE = 4 << 20

    def __init__(self, encoding: str) -> None:
        self._d = zlib.decompressobj(47 if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS)
        self._arrived = 0
        self._inflated = 0
        self.failed = False

    def __call__(self, chunk: bytes) -> bytes:
        if self.failed or not chunk:
            return b""
        self._arrived += len(chunk)
        try:
            out = self._d.decompress(chunk, self._arrived * self.RATIO + self.ALLOWANCE - self._inflated)
        except zlib.error:
            self.failed = True
            return b""
        self._inflated += len(out)
        if self._d.unconsumed_tail:  # more than the budget: stop here rather than skip what is held back
            self.failed = True
        return out


class Traffic:
    """Pipeline stage; see the module docstring."""

    def __init__(self, *, response_facts: bool = True) -> None:
        self.response_facts = response_facts
        self.models = BoundedLabel()
        self.tools = BoundedLabel()
        self.methods = BoundedLabel(limit=50)
        self.unanswered_tools = BoundedLabel()
        self.unanswered_methods = BoundedLabel(limit=50)
        self._tokens: dict[tuple[str, str, str], Any] = {}   # metric children by labels, looked up once
        self._ttft: dict[str, Any] = {}

    # -- requests -------------------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        facts: RequestFacts | None = meta.get(flowmeta.FACTS)
        if facts is None or _STATE in meta or flow.websocket is not None:
            return
        llm = _quietly(facts.llm)
        mcp = _quietly(facts.mcp) if llm is None else None
        if llm is None and mcp is None:
            return
        meta[_STATE] = _Observation(llm, mcp)
        traffic = meta.setdefault(flowmeta.TRAFFIC, {})
        if llm is not None:
            traffic["llm"] = llm.to_json()
        else:
            assert mcp is not None
            traffic["mcp"] = {**mcp.to_json(), "outcome": "none", "error": None}

    # -- answers --------------------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        obs: _Observation | None = flow.metadata.get(_STATE)
        resp = flow.response
        if obs is None or resp is None or not self.response_facts or flowmeta.REFUSAL in flow.metadata:
            return
        obs.streamed = bool(resp.stream)
        if obs.llm is not None:
            obs.llm_observer = LlmResponseObserver(obs.llm, streamed=obs.streamed)
            feed = obs.llm_observer.feed
        elif obs.mcp is not None and obs.mcp.id is not None:
            obs.mcp_observer = McpResponseObserver(obs.mcp.id)
            feed = obs.mcp_observer.feed
        else:
            return
        if not obs.streamed:
            return
        if callable(resp.stream):  # someone else's stream function: leave the body to it
            obs.llm_observer = obs.mcp_observer = None
            return
        # Every Content-Encoding field, joined: a second one (`identity` then `gzip`) must not go unseen.
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            # A model's answer reads itself as it passes (the cheapest path per chunk: no wrapper around it).
            resp.stream = obs.llm_observer if obs.llm_observer is not None else _observing(feed)
        elif encoding in ("gzip", "x-gzip", "deflate"):
            resp.stream = _observing(feed, _Inflate(encoding))
        else:  # br, zstd: the answer passes unread (its facts say so: no usage reported)
            obs.llm_observer = obs.mcp_observer = None

    def response(self, flow: http.HTTPFlow) -> None:
        obs: _Observation | None = flow.metadata.get(_STATE)
        if obs is None or obs.done:
            return
        resp = flow.response
        if resp is not None and not obs.streamed and flowmeta.REFUSAL not in flow.metadata:
            body = _decoded(resp)
            if body is not None:
                if obs.llm_observer is not None:
                    obs.llm_observer.feed_body(body)
                elif obs.mcp_observer is not None:
                    obs.mcp_observer.feed_body(body)
        self._finish(flow, obs, complete=None)

    def error(self, flow: http.HTTPFlow) -> None:
        obs: _Observation | None = flow.metadata.get(_STATE)
        if obs is not None and not obs.done:
            self._finish(flow, obs, complete=False)

    # -- facts and metrics ----------------------------------------------------------------------------------

    def _finish(self, flow: http.HTTPFlow, obs: _Observation, *, complete: bool | None) -> None:
        obs.done = True
        meta = flow.metadata
        traffic = meta.setdefault(flowmeta.TRAFFIC, {})
        agent = meta.get(flowmeta.AGENT) or "unknown"
        try:
            if obs.llm_observer is not None:
                if obs.llm_observer.failure is not None:
                    log.error("observing a streamed answer failed; it passed on unread",
                              exc_info=obs.llm_observer.failure)
                facts = obs.llm_observer.result(complete=complete, sent_at=flow.request.timestamp_end)
                traffic["llm"] = facts
                self._count_llm(agent, facts)
            elif obs.mcp is not None:
                mcp = traffic.get("mcp") or obs.mcp.to_json()
                if obs.mcp_observer is not None:
                    mcp = {**mcp, **obs.mcp_observer.result()}
                elif flowmeta.REFUSAL in meta:
                    mcp = {**mcp, "outcome": "refused"}
                traffic["mcp"] = mcp
                self._count_mcp(agent, mcp)
        except Exception:  # facts are a bonus: never let them break the call or its record
            log.exception("could not read the answer of request %s", meta.get(flowmeta.REQUEST_ID))

    def _count_llm(self, agent: str, facts: dict[str, Any]) -> None:
        if not facts.get("usage_reported") and facts.get("time_to_first_token_s") is None:
            return  # no answer read (refused, or the upstream failed): nothing to count, no label to spend
        model = self.models(facts.get("model"))
        for kind, n in usage_tokens(facts).items():
            key = (agent, model, kind)
            counter = self._tokens.get(key)
            if counter is None:
                counter = self._tokens[key] = metrics.LLM_TOKENS.labels(agent, model, kind)
            counter.inc(n)
        ttft = facts.get("time_to_first_token_s")
        if ttft is not None:
            histogram = self._ttft.get(model)
            if histogram is None:
                histogram = self._ttft[model] = metrics.LLM_TIME_TO_FIRST_TOKEN.labels(model)
            histogram.observe(ttft)

    def _count_mcp(self, agent: str, facts: dict[str, Any]) -> None:
        """Names of calls no server answered (refused ones, say) take their labels from a set of their own, so
        an agent making up tool names cannot use up the labels of the tools that really run."""
        answered = facts.get("outcome") in ("result", "error", "tool_error")
        methods, tools = (self.methods, self.tools) if answered else (self.unanswered_methods, self.unanswered_tools)
        method = methods(facts.get("method"))
        tool = tools(facts.get("tool")) if facts.get("tool") else ""
        metrics.MCP_CALLS.labels(agent, method, tool, facts.get("outcome") or "none").inc()


def _observing(feed: Callable[[bytes], None], decode: _Inflate | None = None) -> Callable[[bytes], bytes]:
    """A `flow.response.stream` function: shows each chunk to `feed` (decoded first if need be) and passes it
    on unchanged. A failing observer is dropped, never the stream."""
    broken = False

    def chunk(data: bytes) -> bytes:
        nonlocal broken
        if not broken:
            try:
                if decode is None:
                    feed(data)
                elif data:
                    decoded = decode(data)
                    if decoded:   # (a gzip header, a flush: nothing yet; b"" would end the answer)
                        feed(decoded)
                else:
                    feed(b"")
            except Exception:
                broken = True
                log.exception("observing a streamed answer failed; it passes on unread")
        return data

    return chunk


def _decoded(resp: http.Response) -> bytes | None:
    raw = resp.raw_content
    if not raw:
        return None
    encoding = resp.headers.get("content-encoding", "")
    if not encoding.strip() or encoding.strip().lower() == "identity":
        return raw
    try:
        return decode_content(raw, encoding, BODY_LIMIT).data
    except DecodeError:
        return None


def _quietly(get: Callable[[], Any]) -> Any:
    """A request fact, or None when it cannot be known (the rules already failed closed on it)."""
    try:
        return get()
    except (EvalError, McpProblem):
        return None
