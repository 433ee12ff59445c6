"""Small helpers for policy tests: build a policy from a YAML string, evaluate a request in one call."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from bastion.policy.decision import Decision
from bastion.policy.engine import Policy
from bastion.policy.facts import RequestFacts
from bastion.policy.load import load_policy


def policy_from(tmp_path: Path, text: str, name: str = "policy.yaml") -> Policy:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    return load_policy([f])


def decide(policy: Policy, agent: str, method: str, url: str, body: Any = None,
           headers: dict[str, str] | None = None) -> Decision:
    raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    return policy.evaluate(RequestFacts.from_url(method, url, headers=headers, body=raw), agent)
