"""Realistic audit records for the benchmark, the demo and tests: an LLM chat call with a few KB of JSON.

Not used by the proxy. Kept in the package so `bastion demo` and `bench/audit_bench.py` build records the
same way the proxy does (raw headers, captured bodies), secrets included, so redaction is exercised too.
"""

from __future__ import annotations

import json
import random

from bastion.audit.bodies import CapturedBody, capture_bytes
from bastion.audit.record import AuditRecord, DecisionFacts, Identity, Request, Response, Timings
from bastion.ids import new_request_id, now_us

_WORDS = ("ticket", "customer", "refund", "order", "shipping", "invoice", "account", "please", "thanks",
          "delayed", "package", "address", "update", "status", "billing", "support", "reply", "issue")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def sample_exchange(*, agent: str = "support-bot", body_words: int = 300, seed: int | None = None,
                    max_body_bytes: int = 1 << 20) -> tuple[AuditRecord, CapturedBody, CapturedBody]:
    """One allowed POST /v1/chat/completions with a JSON request and response of roughly `6 * body_words`
    bytes each, as the proxy would submit it (unredacted: it carries an Authorization header)."""
    rng = random.Random(seed)  # noqa: S311 - filler text, not secrets
    request = json.dumps({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You are a support assistant."},
                     {"role": "user", "content": _text(rng, body_words)}],
        "max_tokens": 512, "temperature": 0.2,
    }).encode()
    response = json.dumps({
        "id": f"chatcmpl-{rng.getrandbits(64):016x}", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": _text(rng, body_words)}}],
        "usage": {"prompt_tokens": body_words + 20, "completion_tokens": body_words, "total_tokens": 2 * body_words},
    }).encode()
    start = now_us()
    record = AuditRecord(
        id=new_request_id(), started_us=start, ended_us=start + 850_000,
        identity=Identity(agent=agent, auth="basic", client="127.0.0.1:53124"),
        request=Request("POST", "https://api.openai.com/v1/chat/completions", "HTTP/1.1", [
            ("Host", "api.openai.com"), ("Content-Type", "application/json"),
            ("Authorization", "Bearer sk-proj-" + "x" * 40), ("User-Agent", "OpenAI/Python 1.40.0"),
            ("Content-Length", str(len(request)))]),
        response=Response(200, "OK", "HTTP/1.1", [
            ("Content-Type", "application/json"), ("x-request-id", f"req_{rng.getrandbits(48):012x}"),
            ("openai-processing-ms", "812"), ("Content-Length", str(len(response)))]),
        outcome="forwarded",
        decision=DecisionFacts("allow", "allow", "enforce", ["llm-chat"]),
        policy_revision="4f2c" * 16,
        upstream="104.18.7.192:443",
        timings=Timings(total_us=850_000, decision_us=35, upstream_us=840_000),
        extra={"llm": {"provider": "openai", "api": "chat.completions", "operation": "chat",
                       "request_model": "gpt-4o-mini", "response_model": "gpt-4o-mini-2024-07-18",
                       "model": "gpt-4o-mini-2024-07-18", "stream": False, "tools": [], "tool_calls": [],
                       "finish_reasons": ["stop"], "response_id": "chatcmpl-1", "usage_reported": True,
                       "usage": {"input_tokens": body_words + 20, "output_tokens": body_words},
                       "time_to_first_token_s": None, "complete": True, "error": None}},
    )
    req = capture_bytes(request, max_body_bytes, content_type="application/json")
    resp = capture_bytes(response, max_body_bytes, content_type="application/json")
    return record, req, resp
