"""Pydantic models of the rules YAML: the structure, types and closed key sets.

Structural checks live here (types, unknown keys, required fields, value formats). Checks that need the whole
policy (undefined agents or roles, duplicate ids across files, bad regexes, template names) live in the
compiler (`engine.py`), which reports them with the same `FILE:LINE` precision.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from bastion.policy.facts import ALLOWABLE_FORMS

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """`30s`, `15m`, `1h`, `1h30m`, `500ms`, `2d`, or a plain number of seconds. Always > 0."""
    if isinstance(value, bool):
        raise ValueError("a duration must be like 30s, 15m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"bad duration {value!r}: use a number with a unit, like 30s, 15m, 1h or 1h30m")
    else:
        raise ValueError("a duration must be like 30s, 15m or 1h")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
StrOrList = str | list[str]

RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _sha256(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if not SHA256_HEX.match(v):
        raise ValueError("token_sha256 must be 64 hex characters (run `bastion token NAME` to make one)")
    return v


class Defaults(Strict):
    effect: Literal["allow", "deny"]
    mode: Literal["enforce", "report"] = "enforce"


class AgentModel(Strict):
    roles: list[str] = Field(default_factory=list)
    token_sha256: str | None = None
    status: Literal["active", "retired"] = "active"
    mode: Literal["enforce", "report"] | None = None
    owner: str | None = None
    description: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return _sha256(v)


class UserModel(Strict):
    roles: list[str] = Field(default_factory=list)
    token_sha256: str | None = None
    description: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return _sha256(v)


class LlmMatchModel(Strict):
    """`match: {llm: {...}}`: an OpenAI- or Anthropic-style model call, recognised by its shape on any host.
    Each key takes a value, a list (any of) or an operator map; `llm: {}` matches every LLM call."""

    provider: Any = Field(default=None, description="openai or anthropic (the API style)")
    api: Any = Field(default=None, description="chat.completions, completions, responses, embeddings or messages")
    model: Any = Field(default=None, description="the model the request asks for")
    tool: Any = Field(default=None, description="a tool the request offers or forces")
    stream: bool | None = Field(default=None, description="whether the answer is streamed")


class McpMatchModel(Strict):
    """`match: {mcp: {...}}`: a JSON-RPC message of MCP's streamable HTTP transport. `mcp: {}` matches every
    JSON-RPC call; requests that are not JSON-RPC (the transport's GET and DELETE) do not match."""

    method: Any = Field(default=None, description="the JSON-RPC method, e.g. tools/call")
    tool: Any = Field(default=None, description="the tool (tools/call) or prompt (prompts/get) name")
    resource: Any = Field(default=None, description="the resource uri of resources/read")
    args: dict[str, Any] | None = Field(default=None, description="dotted argument path -> condition")


class MatchModel(Strict):
    """Every key is optional; all given keys must match (AND). Lists inside a key mean any of (OR)."""

    host: StrOrList | None = None
    port: int | list[int] | None = None
    scheme: StrOrList | None = None
    method: StrOrList | None = None
    path: StrOrList | None = None
    query: dict[str, Any] | None = None
    headers: dict[str, Any] | None = None
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    llm: LlmMatchModel | None = None
    mcp: McpMatchModel | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LockModel(Strict):
    key: str
    ttl: Duration = 900.0


DEFAULT_MILESTONE_TTL = 7 * 86400.0


class CompleteModel(Strict):
    """`complete`: the milestone a rule records once the upstream answers 2xx (a template, like lock keys)."""

    key: str = Field(description="milestone key template, e.g. extracted:{report}")
    ttl: Duration = Field(default=DEFAULT_MILESTONE_TTL, description="how long the milestone lasts (default 7d)")

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        if v > 30 * 86400:
            raise ValueError("a milestone ttl is at most 30d")
        return v


class ApprovalModel(Strict):
    approvers: list[str] = Field(default_factory=lambda: ["role:approver"], min_length=1)
    wait: Duration = 30.0
    timeout: Duration = 3600.0
    required: int = Field(default=1, ge=1, le=10)
    use_within: Duration = 900.0
    grants: bool = True


class WebhookModel(Strict):
    url: str
    secret_env: str | None = None
    timeout: Duration = 5.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("the webhook url must start with http:// or https:// and name a host")
        return v

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError("secret_env names an environment variable (letters, digits, _), not the secret itself")
        return v


class ApprovalsModel(Strict):
    """Fleet-wide approval settings: where people are told about approvals, and where they decide them."""

    webhook: WebhookModel | None = None
    link: str | None = None
    max_open_per_minute: int = Field(default=60, ge=1, le=100_000)


class RuleModel(Strict):
    id: str
    effect: Literal["allow", "deny", "hold"]
    agents: list[str] = Field(min_length=1)
    match: MatchModel | None = None
    unless: MatchModel | list[MatchModel] | None = None
    lock: LockModel | None = None
    release: StrOrList | None = None
    approval: ApprovalModel | None = None
    requires: StrOrList | None = Field(default=None, description="milestones (templates) that must exist, else "
                                                                 "424 dependency_pending")
    complete: CompleteModel | list[CompleteModel] | None = Field(
        default=None, description="milestone(s) recorded once the upstream answers 2xx")
    message: str | None = None
    description: str | None = None
    owner: str | None = None

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a rule id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class BudgetLimitModel(Strict):
    """`limit`: calls or LLM tokens (one of them) per window."""

    calls: int | None = Field(default=None, ge=1, description="calls per window")
    tokens: int | None = Field(default=None, ge=1, description="LLM tokens (input + output) per window")
    per: Duration = Field(description="the window, e.g. 1h; windows are aligned to the epoch")

    @field_validator("per")
    @classmethod
    def _per(cls, v: float) -> float:
        if v < 1 or v > 31 * 86400:
            raise ValueError("a budget window is between 1s and 31d")
        return v

    @model_validator(mode="after")
    def _one_unit(self) -> BudgetLimitModel:
        if (self.calls is None) == (self.tokens is None):
            raise ValueError("give exactly one of `calls` and `tokens`")
        return self


class BudgetModel(Strict):
    """A budget shared by the fleet through the store: reserved before a call, settled after its answer."""

    id: str
    agents: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    match: MatchModel | None = Field(default=None, description="which calls count (default: every call)")
    limit: BudgetLimitModel
    key: str = Field(default="{agent}", description="what the budget is per: a template, default {agent}")
    estimate: int | None = Field(default=None, ge=0, le=10_000_000,
                                 description="tokens reserved per call before its usage is known (default: "
                                             "from the request: its size and max_tokens)")
    description: str | None = None

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a budget id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class GuardWhenModel(Strict):
    """`when`: one rate per agent, counted across the fleet in fixed windows."""

    denials: int | None = Field(default=None, ge=1, description="refusals by the rules (403 policy_denied)")
    errors: int | None = Field(default=None, ge=1, description="upstream errors (5xx or no answer)")
    calls: int | None = Field(default=None, ge=1, description="calls of any outcome")
    per: Duration

    @field_validator("per")
    @classmethod
    def _per(cls, v: float) -> float:
        if v < 1 or v > 86400:
            raise ValueError("a guard window is between 1s and 1d")
        return v

    @model_validator(mode="after")
    def _one_rate(self) -> GuardWhenModel:
        if sum(x is not None for x in (self.denials, self.errors, self.calls)) != 1:
            raise ValueError("give exactly one of `denials`, `errors` and `calls`")
        return self


class GuardModel(Strict):
    """An automatic response to a runaway agent: past the rate, the agent is paused fleet-wide."""

    id: str
    agents: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    when: GuardWhenModel
    action: Literal["pause", "hold"] = Field(default="pause", description="pause: refuse the agent's calls "
                                             "(403 agent_paused); hold: hold each of them for a person")
    description: str | None = None

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a guard id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class NetworkModel(Strict):
    allow_private: list[str] = Field(default_factory=list)


class RetentionModel(Strict):
    records: Duration | None = None
    bodies: Duration | None = None


class AuditModel(Strict):
    max_body_bytes: int = Field(default=1 << 20, ge=0)
    redact_headers: list[str] = Field(default_factory=list)
    redact_json_keys: list[str] = Field(default_factory=list)
    redact_patterns: list[str] = Field(default_factory=list)
    on_failure: Literal["deny", "allow"] = "deny"
    retention: RetentionModel | None = None


_NEVER_ALLOWED = ("control", "controls", "control_characters", "nul", "null")


def _allow_form(value: str) -> str:
    """One `normalize.allow` entry: a known ambiguous form. Control characters are refused whatever the policy
    says: no upstream gives them a meaning worth the risk, so there is no key for them."""
    if value in ALLOWABLE_FORMS:
        return value
    if value.lower() in _NEVER_ALLOWED:
        raise ValueError("control characters in a path are always refused and cannot be allowed")
    close = difflib.get_close_matches(value, ALLOWABLE_FORMS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown form {value!r}{hint}; expected one of: {', '.join(ALLOWABLE_FORMS)}")


class NormalizeModel(Strict):
    """How ambiguous request paths are treated (README "How requests are normalized")."""

    path_case: Literal["cautious", "sensitive", "insensitive"] = "cautious"
    escaped_slashes: Literal["reject", "keep", "decode"] = "reject"
    allow: list[Annotated[str, AfterValidator(_allow_form)]] = Field(default_factory=list)


class PolicyFile(Strict):
    """One YAML file. Several files merge into one policy (see load.py)."""

    version: Literal[1]
    defaults: Defaults | None = None
    agents: dict[str, AgentModel] = Field(default_factory=dict)
    users: dict[str, UserModel] = Field(default_factory=dict)
    rules: list[RuleModel] = Field(default_factory=list)
    budgets: list[BudgetModel] = Field(default_factory=list)
    guards: list[GuardModel] = Field(default_factory=list)
    network: NetworkModel | None = None
    audit: AuditModel | None = None
    approvals: ApprovalsModel | None = None
    normalize: NormalizeModel | None = None
