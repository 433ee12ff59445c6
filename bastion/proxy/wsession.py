"""WebSocket sessions: every message of an allowed session goes into its audit record, and the policy judges
what the agent sends.

The upgrade request is decided like any request (`bastion.proxy.enforce`). Once the session is open, mitmproxy
calls `websocket_message` for each message, in either direction, before relaying it. This stage then:

- records it in `extra["websocket"]` of the session's audit record (`flow.metadata[flowmeta.TRAFFIC]`; the
  capture takes the record at `websocket_end`, so it holds the whole session). Records are bounded like bodies:
  at most `max_text_chars` characters of each text message, a sha256 (and no content) for a binary one, at most
  `max_messages` entries and `max_text_bytes` bytes of kept text per session. Past a bound, messages are still
  counted (`total`, `bytes`), only no longer listed.
- checks each client message that looks like JSON (`looks_like_json`), text or binary, against the rules, as if
  it were the body of the upgrade request (same method, URL and headers): the rules that match the session's
  URL decide, `json`, `mcp` and `llm` conditions included. A deny (or a hold: nobody can approve a message
  while the session waits, and a task lock, which cannot be taken for a single message) drops the message, so
  it never reaches the upstream, and closes the session with code 1008 and the rule's message as the reason.
  In report mode the refusal is logged only. Messages that do not look like JSON, and server messages, are
  recorded but not checked.

Why "looks like JSON" and not "parses as JSON": servers read what Python's json refuses (Node reads numbers of
any length, Go's json.Decoder stops after the first value and ignores what follows, some parsers nest deeper),
and a binary message is as readable as a text one (`json.loads(bytes)`, `JSON.parse(buffer)`). So a message
is judged when its first significant byte says it is a JSON object or array: after an optional UTF-8 BOM and
JSON whitespace (also form feed and vertical tab, which lenient parsers skip), `{` or `[`, anywhere in the
message (one C-level regex scan), or the same in UTF-16/32, which Python's json detects by a BOM or NUL bytes.
One that then cannot be parsed (too large, too deep, a huge number, trailing data) is judged like a body that
cannot be: its `json`, `mcp` and `llm` conditions fail closed, so deny and hold rules with such conditions
apply and allow rules with them do not. Anything that goes wrong while judging a message refuses it: it is
never relayed unjudged. Why not every message: evaluating plain text would make every deny rule with a
`json` condition apply to it, so chat-style text protocols could not pass at all.

Message size: mitmproxy assembles a whole message before this stage sees it; `bastion.proxy.httplimits`
bounds that (`WEBSOCKET_MESSAGE_LIMIT`) and closes a session whose message passes it with 1009. Such a close,
like a 1008 of this stage, is recorded as closed by Bastion (`httplimits.BASTION_CLOSE` on the flow).

Closing: mitmproxy 12 has no API to close a WebSocket from an addon (mitmproxy issue #4773), only one to inject
messages. The stage finds the session's `WebsocketLayer` (walking the client connection's layer tree), queues a
close frame on its client side and injects an empty client message to make the layer process it: the layer then
closes both sides exactly as when a client closes (1008 and the reason to the client and to the upstream),
calls `websocket_end` and stops relaying. The empty message, and anything either side sends while the session
closes, is dropped. (`httplimits` makes the layer half-close the TCP connections of a close Bastion started, so
that a client still sending gets the close frame instead of a reset.) Should the layer not be found (a
mitmproxy change), the client connection is cut instead: fail closed, a refused session never keeps talking.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers.websocket import WebsocketLayer, WebSocketMessageInjected
from mitmproxy.websocket import WebSocketMessage
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection
from wsproto.frame_protocol import Opcode

from bastion import metrics
from bastion.audit.settings import DEFAULT_MAX_BODY_BYTES
from bastion.policy.decision import Decision
from bastion.policy.facts import RequestFacts
from bastion.proxy import flowmeta
from bastion.proxy.httplimits import BASTION_CLOSE, close_by_bastion

log = logging.getLogger("bastion.proxy")

POLICY_VIOLATION = 1008
"""Close code of a session Bastion refused (RFC 6455: "policy violation")."""

MAX_CLOSE_REASON = 123
"""Bytes (UTF-8) a close reason may take: a close frame's payload is at most 125, two of them the code."""

MAX_TEXT_CHARS = 4096
MAX_MESSAGES = 1000
_MAX_LAYERS = 256  # layers visited looking for a session's WebsocketLayer (a connection has a dozen or two)

_STATE = "bastion.wsession"
_RESET_CACHES = {f.name: f.default for f in dataclasses.fields(RequestFacts)  # what facts parsed of the body
                 if f.name.startswith("_") and f.default is not dataclasses.MISSING}
_GENERIC_REFUSAL = "Bastion could not check this message; the session was closed."
_UTF8_BOM = codecs.BOM_UTF8
_FIRST_SIGNIFICANT = re.compile(rb"[^ \t\r\n\f\v]")
_COUNTERS = {True: metrics.WEBSOCKET_MESSAGES.labels("client"), False: metrics.WEBSOCKET_MESSAGES.labels("server")}


@dataclass(slots=True)
class _Session:
    """One open session: what was pinned at upgrade time, and its record so far."""

    started: float  # time.monotonic() at websocket_start
    facts: RequestFacts | None  # the upgrade request's facts (no body)
    policy: Any
    agent: str | None
    record: dict[str, Any]  # extra["websocket"]
    text_budget: int  # bytes of message text the record may still keep
    closing: str | None = None  # the close reason once Bastion refused the session
    cut: bool = False  # the connection was cut (no close frame could be sent)


class WebSocketSessions:
    """Pipeline stage, after the gate and before the audit capture; see the module docstring.

    `proxyserver` is mitmproxy's Proxyserver addon (it knows each connection's handler, through which the stage
    reaches a session to close it). `max_text_bytes` is the audit's `max_body_bytes`, or a function that
    reads it (so that a reload of the audit settings applies to the sessions opened after it).

    The policy and agent of a session are the ones pinned on the flow when the upgrade was decided: a policy
    reload does not change the rules of a session already open (sessions opened after it get the new rules),
    as for an HTTP request already in flight. Close a session to make it follow new rules."""

    def __init__(self, proxyserver: Any, *, max_text_chars: int = MAX_TEXT_CHARS,
                 max_messages: int = MAX_MESSAGES, max_text_bytes: int | Callable[[], int] | None = None) -> None:
        self._proxyserver = proxyserver
        self.max_text_chars = max(0, max_text_chars)
        self.max_messages = max(0, max_messages)
        self._max_text_bytes = DEFAULT_MAX_BODY_BYTES if max_text_bytes is None else max_text_bytes

    @property
    def max_text_bytes(self) -> int:
        """Bytes of message text one session's record keeps, at most (read when a session opens)."""
        limit = self._max_text_bytes
        return max(0, limit() if callable(limit) else limit)

    # -- hooks ----------------------------------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata
        record: dict[str, Any] = {"messages": [], "kept": 0, "total": 0, "bytes": {"client": 0, "server": 0},
                                  "close": None}
        traffic = meta.get(flowmeta.TRAFFIC)
        if not isinstance(traffic, dict):
            traffic = meta[flowmeta.TRAFFIC] = {}
        traffic["websocket"] = record
        meta[_STATE] = _Session(time.monotonic(), meta.get(flowmeta.FACTS), meta.get(flowmeta.POLICY),
                                meta.get(flowmeta.AGENT), record, self.max_text_bytes)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        session: _Session | None = flow.metadata.get(_STATE)
        ws = flow.websocket
        if session is None or ws is None or not ws.messages:
            return
        message = ws.messages[-1]
        try:
            self._handle(flow, session, message)
        except Exception:  # mitmproxy would log it and relay the message: refuse it instead
            log.exception("websocket message handling failed (request_id=%s)", flow.metadata.get(flowmeta.REQUEST_ID))
            message.drop()
            if session.closing is None:
                self._refuse(flow, session, _GENERIC_REFUSAL)

    def _handle(self, flow: http.HTTPFlow, session: _Session, message: WebSocketMessage) -> None:
        if session.closing is not None:  # refused: nothing more goes through, either way
            message.drop()
            if not message.injected:  # the empty message that drives the close is Bastion's own
                self._note(session, message, refused=True)
            return
        refusal = None
        if message.from_client and not message.injected:
            refusal = self._check(flow, session, message.content)
        if refusal is not None:
            message.drop()
        self._note(session, message, refused=refusal is not None)
        if refusal is not None:
            self._refuse(flow, session, refusal)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        session: _Session | None = flow.metadata.get(_STATE)
        ws = flow.websocket
        if session is None or ws is None:
            return
        reason = ws.close_reason if isinstance(ws.close_reason, str) else ""
        code = ws.close_code if isinstance(ws.close_code, int) else None
        ours = flow.metadata.get(BASTION_CLOSE)  # (code, reason) of the close Bastion started, if it did
        if ours is not None and (session.cut or (code, reason) == ours):
            session.record["close"] = {"code": None if session.cut else ours[0], "reason": ours[1], "by": "bastion"}
        else:  # the peer's own close (also when it closed before Bastion's close went out)
            session.record["close"] = {"code": code, "reason": cut_close_reason(reason),
                                       "by": "client" if ws.closed_by_client else "server"}

    # -- the record -----------------------------------------------------------------------------------------

    def _note(self, session: _Session, message: WebSocketMessage, *, refused: bool) -> None:
        """Count the message (`bastion_websocket_messages_total` only when it is relayed); list it while the
        session's record has room."""
        record = session.record
        content = message.content
        direction = "client" if message.from_client else "server"
        record["total"] += 1
        record["bytes"][direction] += len(content)
        if not refused:
            _COUNTERS[message.from_client].inc()
        if record["kept"] >= self.max_messages:
            return
        entry: dict[str, Any] = {"dir": direction, "t": round(time.monotonic() - session.started, 3),
                                 "type": "text" if message.is_text else "binary", "size": len(content)}
        if message.is_text:
            text, cut = self._kept_text(session, content)
            entry["text"] = text
        else:
            entry["sha256"] = hashlib.sha256(content).hexdigest()
            cut = False
        entry["cut"] = cut
        entry["refused"] = refused
        record["messages"].append(entry)
        record["kept"] += 1

    def _kept_text(self, session: _Session, content: bytes) -> tuple[str, bool]:
        """The text kept of one message (at most `max_text_chars` characters, within the session's budget)."""
        limit = self.max_text_chars
        head = content[: limit * 4]  # a character is at most 4 bytes: enough for `limit` whole characters
        text = head.decode("utf-8", "replace")
        cut = len(head) < len(content) or len(text) > limit
        text = text[:limit]
        raw = text.encode()
        if len(raw) > session.text_budget:
            raw = raw[: session.text_budget]
            text = raw.decode("utf-8", "ignore")
            cut = True
        session.text_budget -= len(raw)
        return text, cut

    # -- the policy -----------------------------------------------------------------------------------------

    def _check(self, flow: http.HTTPFlow, session: _Session, content: bytes) -> str | None:
        """The close reason when the rules refuse this client message; None when it may pass (or does not look
        like JSON, and so is not checked). Never raises: a message whose check failed is refused."""
        try:
            if not looks_like_json(content):
                return None
            return self._judge(flow, session, content)
        except Exception:  # never let a message through whose decision failed
            log.exception("policy evaluation of a websocket message failed (request_id=%s)",
                          flow.metadata.get(flowmeta.REQUEST_ID))
            return _GENERIC_REFUSAL

    def _judge(self, flow: http.HTTPFlow, session: _Session, content: bytes) -> str | None:
        """The rules' verdict on a message that looks like JSON: the close reason, or None to let it pass."""
        base, policy, agent = session.facts, session.policy, session.agent
        if base is None or policy is None or agent is None:  # should not happen: the upgrade was decided
            return "Bastion cannot check this session's messages; the session was closed."
        facts = message_facts(base, content)
        decision: Decision = policy.evaluate(facts, agent)
        if not (decision.would_effect != "allow" or decision.locks or decision.releases):
            return None
        reason = refusal_reason(decision)
        if decision.mode == "report":
            log.info("report mode: would close websocket %s://%s:%d%s on a client message: %s (agent=%s rule=%s "
                     "request_id=%s)", facts.scheme, facts.host, facts.port, facts.path, reason, agent,
                     decision.rule, flow.metadata.get(flowmeta.REQUEST_ID))
            return None
        return reason

    def _refuse(self, flow: http.HTTPFlow, session: _Session, reason: str) -> None:
        """Close the session: 1008 and `reason` to both sides (or cut the connection, if that fails)."""
        session.closing = cut_close_reason(reason)
        close_by_bastion(flow, POLICY_VIOLATION, session.closing)
        metrics.WEBSOCKET_REFUSALS.inc()
        if log.isEnabledFor(logging.INFO):
            req = flow.request
            log.info("refused websocket message %s%s: %s (agent=%s request_id=%s)", req.pretty_host,
                     req.path.partition("?")[0], reason, flow.metadata.get(flowmeta.AGENT, "-"),
                     flow.metadata.get(flowmeta.REQUEST_ID))
        if not self._close(flow, session.closing):
            session.cut = True
            self._cut(flow)

    def _close(self, flow: http.HTTPFlow, reason: str) -> bool:
        layer = websocket_layer(self._proxyserver, flow)
        if layer is None or layer.client_ws.state is not ConnectionState.OPEN:
            return False
        # Processed like a close the client sent, once the layer handles the injected (empty, dropped) message.
        layer.client_ws._events.append(CloseConnection(code=POLICY_VIOLATION, reason=reason))
        try:
            self._proxyserver.inject_event(
                WebSocketMessageInjected(flow, WebSocketMessage(Opcode.TEXT, True, b"")))
        except ValueError:  # the connection is gone already
            return False
        return True

    def _cut(self, flow: http.HTTPFlow) -> None:
        handler = self._proxyserver.connections.get(flow.client_conn.id)
        io = handler.transports.get(flow.client_conn) if handler is not None else None
        if io is not None and io.handler is not None:
            log.warning("websocket %s: closing by cutting the connection (no close frame could be sent)",
                        flow.metadata.get(flowmeta.REQUEST_ID))
            io.handler.cancel("websocket refused")


def message_facts(base: RequestFacts, content: bytes) -> RequestFacts:
    """The upgrade request's facts with `content` as their body (what the rules see of one message)."""
    return dataclasses.replace(base, body=content, **_RESET_CACHES)


def looks_like_json(content: bytes) -> bool:
    """Does this message start like a JSON object or array, as some server may read it? True when its first
    byte that is not JSON whitespace (space, tab, CR, LF; also form feed and vertical tab), after an optional
    UTF-8 BOM, is `{` or `[`, however much whitespace comes first; or when it is UTF-16/32 (as
    `json.detect_encoding` tells by a BOM or NUL bytes) whose first such character is `{` or `[`. Whether it
    then parses does not matter (see the module docstring). Cheap: one regex scan that stops at the first
    significant character, no copy."""
    wide = _wide_encoding(content)
    if wide is not None:
        encoding, start = wide
        return _WIDE_OPENING[encoding].match(content, start) is not None
    first = _FIRST_SIGNIFICANT.search(content, len(_UTF8_BOM) if content.startswith(_UTF8_BOM) else 0)
    return first is not None and content[first.start()] in b"{["


def _wide_encoding(content: bytes) -> tuple[str, int] | None:
    """(encoding, BOM length) when Python's json reads `content` as UTF-16/32 (`json.detect_encoding`'s rules,
    with the byte order a BOM gives spelled out), else None (UTF-8)."""
    for bom, encoding in _WIDE_BOMS:
        if content.startswith(bom):
            return encoding, len(bom)
    if len(content) >= 4:
        if not content[0]:
            return ("utf-16-be" if content[1] else "utf-32-be"), 0
        if not content[1]:
            return ("utf-16-le" if content[2] or content[3] else "utf-32-le"), 0
    return None


def _opening(unit: Callable[[bytes], bytes]) -> re.Pattern[bytes]:
    """JSON whitespace, then `{` or `[`, each character written as `unit(its ASCII byte)`."""
    space = b"|".join(re.escape(unit(bytes([c]))) for c in b" \t\r\n\f\v")
    opening = b"|".join(re.escape(unit(bytes([c]))) for c in b"{[")
    return re.compile(b"(?:" + space + b")*+(?:" + opening + b")")  # possessive: the units never overlap


_WIDE_BOMS = ((codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF32_LE, "utf-32-le"),  # UTF-32 first: FF FE 00 00
              (codecs.BOM_UTF16_BE, "utf-16-be"), (codecs.BOM_UTF16_LE, "utf-16-le"))
_WIDE_OPENING = {
    "utf-16-be": _opening(lambda c: b"\0" + c),
    "utf-16-le": _opening(lambda c: c + b"\0"),
    "utf-32-be": _opening(lambda c: b"\0\0\0" + c),
    "utf-32-le": _opening(lambda c: c + b"\0\0\0"),
}


def refusal_reason(decision: Decision) -> str:
    """What the agent is told when a message is refused (the close reason, before `cut_close_reason`)."""
    rule = decision.rule
    if decision.would_effect == "hold":
        return f"Approvals are not available for WebSocket messages (rule {rule}); the message was refused."
    if decision.would_effect == "allow":  # a task lock
        lock_rule = next((a.rule for a in (*decision.locks, *decision.releases)), rule)
        return f"Task locks are not available for WebSocket messages (rule {lock_rule}); the message was refused."
    if decision.message:
        return decision.message
    if rule is not None:
        return f"Denied by rule {rule}."
    return "No rule allows this WebSocket message (default: deny)."


def cut_close_reason(reason: str) -> str:
    """`reason` within a close frame's 123 bytes of UTF-8, cut at a character boundary."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_CLOSE_REASON:
        return reason
    return raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


def websocket_layer(proxyserver: Any, flow: http.HTTPFlow) -> WebsocketLayer | None:
    """The mitmproxy layer relaying `flow`'s session, found in its client connection's layer tree, or None.

    mitmproxy keeps no reference from a flow to its layer, and links layers in several ways: a context's layer
    stack, `child_layer` (tunnels, TLS, an HTTP stream after an upgrade), `layer` (next layer), a delegating
    `_handle_event` bound to the child (proxy modes), `streams` (an HTTP connection's requests)."""
    handler = proxyserver.connections.get(flow.client_conn.id)
    if handler is None:
        return None
    todo: list[Layer] = [handler.layer]
    seen: set[int] = set()
    while todo and len(seen) < _MAX_LAYERS:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, WebsocketLayer):
            if layer.flow is flow:
                return layer
            continue
        todo.extend(child for child in _linked(layer) if id(child) not in seen)
    return None


def _linked(layer: Layer) -> list[Layer]:
    found: list[Any] = [*getattr(layer.context, "layers", ())]
    found += (getattr(layer, "layer", None), getattr(layer, "child_layer", None),
              getattr(getattr(layer, "_handle_event", None), "__self__", None))
    streams = getattr(layer, "streams", None)
    if isinstance(streams, dict):
        found += streams.values()
    return [x for x in found if isinstance(x, Layer)]
