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


class PolicyValueError(ValueError):
    """A value error that names its kind (a code of docs/policy-errors.md). Pydantic keeps the exception in
    the error's `ctx`, so the loader can report `code` rather than the generic `bad_value`; it stays a
    ValueError, so pydantic still catches it and callers of the helpers still see one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_duration(value: Any) -> float:
    """`30s`, `15m`, `1h`, `1h30m`, `500ms`, `2d`, or a plain number of seconds. Always > 0."""
    if isinstance(value, bool):
        raise PolicyValueError("bad_duration", "a duration must be like 30s, 15m or 1h")
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
            raise PolicyValueError("bad_duration",
                                   f"bad duration {value!r}: use a number with a unit, like 30s, 15m, 1h or 1h30m")
    else:
        raise PolicyValueError("bad_duration", "a duration must be like 30s, 15m or 1h")
    if seconds <= 0:
        raise PolicyValueError("bad_duration", f"duration {value!r} must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
StrOrList = str | list[str]

RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Strict(BaseModel):
    """A closed key set: an unknown key is an error (usually a typo), never silently ignored. Attribute
    docstrings are the fields' descriptions, so `bastion schema` gives editors the same words as this file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def _sha256(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if not SHA256_HEX.match(v):
        raise PolicyValueError("bad_token",
                               "token_sha256 must be 64 hex characters (run `bastion token NAME` to make one)")
    return v


class Defaults(Strict):
    """`defaults`: what happens when no rule matches, and the mode. Exactly one file of a policy sets it."""

    effect: Literal["allow", "deny"]
    """The decision when no rule matches: `deny` (recommended) or `allow`."""
    mode: Literal["enforce", "report"] = "enforce"
    """`enforce` applies decisions; `report` lets every call through and records what would have happened."""


class AgentModel(Strict):
    """An agent: a client of the proxy that authenticates as `http://NAME:TOKEN@proxy`."""

    roles: list[str] = Field(default_factory=list)
    """Roles that rules name as `role:NAME`, e.g. [support, billing]."""
    token_sha256: str | None = None
    """sha256 (64 hex characters) of the agent's token, printed by `bastion token NAME`; the token stays secret."""
    status: Literal["active", "retired"] = "active"
    """`retired` refuses every call of the agent (403 agent_retired)."""
    mode: Literal["enforce", "report"] | None = None
    """Overrides `defaults.mode` for this agent: `report` lets its calls through and records the decision."""
    owner: str | None = None
    """The user responsible for the agent (a name under `users`); an owner never approves its agent's calls."""
    description: str | None = None
    """Free text for people."""

    @field_validator("token_sha256")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return _sha256(v)


class UserModel(Strict):
    """A person: approves held calls, uses the admin API, the dashboard and the control commands."""

    roles: list[str] = Field(default_factory=list)
    """Roles, e.g. [approver], [admin], [finance-lead]; approvals name them as `role:NAME`."""
    token_sha256: str | None = None
    """sha256 (64 hex characters) of the user's token, printed by `bastion token NAME`."""
    description: str | None = None
    """Free text for people."""

    @field_validator("token_sha256")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        return _sha256(v)


class LlmMatchModel(Strict):
    """`match: {llm: {...}}`: an OpenAI- or Anthropic-style model call, recognised by its shape on any host.
    Each key takes a value, a list (any of) or an operator map; `llm: {}` matches every LLM call."""

    provider: Any = None
    """The API style: openai or anthropic (a value, a list or an operator map)."""
    api: Any = None
    """chat.completions, completions, responses, embeddings or messages."""
    model: Any = None
    """The model the request asks for, e.g. gpt-4.1 or {prefix: claude-}."""
    tool: Any = None
    """A tool the request offers or forces, e.g. {prefix: code_}."""
    stream: bool | None = None
    """Whether the answer is streamed (true or false)."""


class McpMatchModel(Strict):
    """`match: {mcp: {...}}`: a JSON-RPC message of MCP's streamable HTTP transport. `mcp: {}` matches every
    JSON-RPC call; requests that are not JSON-RPC (the transport's GET and DELETE) do not match."""

    method: Any = None
    """The JSON-RPC method, e.g. tools/call (a value, a list or an operator map)."""
    tool: Any = None
    """The tool (tools/call) or prompt (prompts/get) name, e.g. send_email."""
    resource: Any = None
    """The resource uri of resources/read, e.g. {prefix: "file:///srv/"}."""
    args: dict[str, Any] | None = None
    """The call's arguments: dotted path -> condition, e.g. {to: {suffix: "@example.com"}}."""


class MatchModel(Strict):
    """Every key is optional; all given keys must match (AND). Lists inside a key mean any of (OR)."""

    host: StrOrList | None = None
    """api.example.com, *.example.com (any name below, not the apex), or a list; never a port."""
    port: int | list[int] | None = None
    """A port (1-65535) or a list, e.g. 443."""
    scheme: StrOrList | None = None
    """http, https, ws or wss, or a list."""
    method: StrOrList | None = None
    """An HTTP method or a list, e.g. [GET, HEAD]."""
    path: StrOrList | None = None
    """A path pattern or a list: literal segments, {name} (one segment, captured), * (one segment), ** (the rest)."""
    query: dict[str, Any] | None = None
    """Query parameters: {name: CONDITION}, e.g. {state: open}."""
    headers: dict[str, Any] | None = None
    """Request headers (names case-insensitive): {name: CONDITION}, e.g. {x-env: prod}."""
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    """The JSON body: {dotted.path: CONDITION}; a.0.b indexes lists, * is any element; e.g. {amount: {gt: 500}}."""
    llm: LlmMatchModel | None = None
    """An LLM API call: {provider, api, model, tool, stream}; llm: {} matches every LLM call."""
    mcp: McpMatchModel | None = None
    """An MCP (JSON-RPC) message: {method, tool, resource, args}; mcp: {} matches every JSON-RPC call."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LockModel(Strict):
    """`lock`: a task lock the agent takes (or renews) before the call is forwarded; others get 423 meanwhile."""

    key: str
    """Lock key template, e.g. ticket:{id} ({capture} from the path, {json.a.b}, {query.x}, {header.x-y}, {agent})."""
    ttl: Duration = 900.0
    """How long the lease lasts unless renewed or released, e.g. 15m."""


DEFAULT_MILESTONE_TTL = 7 * 86400.0


class CompleteModel(Strict):
    """`complete`: the milestone a rule records once the upstream answers 2xx (a template, like lock keys)."""

    key: str
    """Milestone key template, e.g. extracted:{report}."""
    ttl: Duration = DEFAULT_MILESTONE_TTL
    """How long the milestone lasts, at most 30d (default 7d)."""

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        if v > 30 * 86400:
            raise ValueError("a milestone ttl is at most 30d")
        return v


class ApprovalModel(Strict):
    """`approval`: who decides a held call, and how long the agent and the approval wait."""

    approvers: list[str] = Field(default_factory=lambda: ["role:approver"], min_length=1)
    """Who may decide: user names or role:NAME (default [role:approver]); never the owner of the calling agent."""
    wait: Duration = 30.0
    """How long the agent's connection is held before 409 approval_pending, e.g. 30s."""
    timeout: Duration = 3600.0
    """An undecided approval expires after this (403 approval_expired), e.g. 1h."""
    required: int = Field(default=1, ge=1, le=10)
    """Distinct approvers needed (1-10); any one deny is final."""
    use_within: Duration = 900.0
    """An approved call must be sent again within this, or the approval lapses, e.g. 15m."""
    grants: bool = True
    """Whether approvers may let later calls of this agent and rule pass for a while (`approve --for 30m`)."""


class WebhookModel(Strict):
    """`approvals.webhook`: a JSON POST on each new pending approval and on each decision (Slack-compatible)."""

    url: str
    """Where notifications are POSTed: an http:// or https:// URL."""
    secret_env: str | None = None
    """Name of the environment variable holding the HMAC secret (not the secret itself), e.g. BASTION_WEBHOOK_SECRET."""
    timeout: Duration = 5.0
    """Per-delivery timeout, e.g. 5s."""

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
    """Notifications of new approvals and decisions: {url, secret_env, timeout}."""
    link: str | None = None
    """Base URL of approval links in notifications (<link>/approvals/<id>), e.g. https://bastion.example.com."""
    max_open_per_minute: int = Field(default=60, ge=1, le=100_000)
    """New approvals one agent may open per minute on one sidecar; beyond: 429 approval_rate_limited."""


class RuleModel(Strict):
    """A rule: the decision is the strongest effect of all matching rules (deny > hold > allow > defaults)."""

    id: str
    """Stable, unique id named by decisions, logs and tests: 1-128 letters, digits and _ . : / -."""
    effect: Literal["allow", "deny", "hold"]
    """allow, deny, or hold (the call waits for a person; see `approval`)."""
    agents: list[str] = Field(min_length=1)
    """Who the rule applies to: agent names, role:NAME, or "*" (every agent)."""
    match: MatchModel | None = None
    """Which requests the rule applies to (all given keys must hold); no `match` matches every request."""
    unless: MatchModel | list[MatchModel] | None = None
    """A match block, or a list of them: the rule does not apply when one holds."""
    lock: LockModel | None = None
    """{key: TEMPLATE, ttl: 15m}: the agent takes (or renews) this task lock before the call is forwarded."""
    release: StrOrList | None = None
    """Lock key template(s) freed once the upstream answers 2xx, e.g. ticket:{id}."""
    approval: ApprovalModel | None = None
    """For hold rules: {approvers, wait, timeout, required, use_within, grants}."""
    requires: StrOrList | None = None
    """Milestone key template(s) that must exist, else 424 dependency_pending, e.g. extracted:{report}."""
    complete: CompleteModel | list[CompleteModel] | None = None
    """Milestone(s) recorded once the upstream answers 2xx: {key: TEMPLATE, ttl: 7d} or a list."""
    message: str | None = None
    """Shown to the agent when this rule refuses a call (deny and hold rules)."""
    description: str | None = None
    """Free text for people."""
    owner: str | None = None
    """Who maintains the rule (free text for people)."""

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a rule id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class BudgetLimitModel(Strict):
    """`limit`: calls or LLM tokens (exactly one of them) per window."""

    calls: int | None = Field(default=None, ge=1)
    """Calls per window, e.g. 100."""
    tokens: int | None = Field(default=None, ge=1)
    """LLM tokens (input + output) per window, e.g. 200000."""
    per: Duration
    """The window, between 1s and 31d, e.g. 1h; windows are aligned to the epoch."""

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
    """Stable, unique budget id: 1-128 letters, digits and _ . : / -."""
    agents: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    """Whose calls count: agent names, role:NAME, or "*" (the default)."""
    match: MatchModel | None = None
    """Which calls count (default: every call)."""
    limit: BudgetLimitModel
    """{calls: N, per: WINDOW} or {tokens: N, per: WINDOW}, e.g. {tokens: 200000, per: 1h}."""
    key: str = "{agent}"
    """What the budget is per: a template, default {agent}, e.g. ticket:{ticket}."""
    estimate: int | None = Field(default=None, ge=0, le=10_000_000)
    """Tokens reserved per call before its usage is known (default: from the request: its size and max_tokens)."""
    description: str | None = None
    """Free text for people."""

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a budget id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class GuardWhenModel(Strict):
    """`when`: one rate per agent (exactly one of denials, errors, calls), counted across the fleet in fixed
    windows."""

    denials: int | None = Field(default=None, ge=1)
    """Refusals by the rules (403 policy_denied) per window."""
    errors: int | None = Field(default=None, ge=1)
    """Upstream errors (5xx or no answer) per window."""
    calls: int | None = Field(default=None, ge=1)
    """Calls of any outcome per window."""
    per: Duration
    """The window, between 1s and 1d, e.g. 1m."""

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
    """Stable, unique guard id: 1-128 letters, digits and _ . : / -."""
    agents: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    """Which agents are watched: agent names, role:NAME, or "*" (the default)."""
    when: GuardWhenModel
    """The rate that trips the guard, e.g. {denials: 20, per: 1m}."""
    action: Literal["pause", "hold"] = "pause"
    """pause: refuse the agent's calls (403 agent_paused); hold: hold each of them for a person."""
    description: str | None = None
    """Free text for people."""

    @field_validator("id")
    @classmethod
    def _id_format(cls, v: str) -> str:
        if not RULE_ID.match(v):
            raise ValueError("a guard id is 1-128 characters: letters, digits and _ . : / -, starting with a "
                             "letter or digit")
        return v


class NetworkModel(Strict):
    """`network`: exceptions to the guard that refuses private, loopback and metadata addresses after DNS."""

    allow_private: list[str] = Field(default_factory=list)
    """Private networks upstreams may be reached on, e.g. [10.20.0.0/16, "::1/128"]."""


class RetentionModel(Strict):
    """`audit.retention`: how long audit records and bodies are kept (whole chain prefixes are pruned)."""

    records: Duration | None = None
    """Keep records this long, e.g. 30d (default: forever)."""
    bodies: Duration | None = None
    """Keep request and response bodies this long, e.g. 7d (default: as long as their records)."""


class AuditModel(Strict):
    """`audit`: what the audit log stores and what happens when records cannot be taken."""

    max_body_bytes: int = Field(default=1 << 20, ge=0)
    """Bodies are stored up to this size (default 1 MiB); longer ones are cut and keep their size and sha256."""
    redact_headers: list[str] = Field(default_factory=list)
    """Extra header names masked in records, e.g. [x-internal-token]."""
    redact_json_keys: list[str] = Field(default_factory=list)
    """Extra JSON keys, form fields and query parameters whose values are masked, e.g. [ssn]."""
    redact_patterns: list[str] = Field(default_factory=list)
    """Extra regexes of values masked anywhere, e.g. ["acct-[0-9]{8}"]."""
    on_failure: Literal["deny", "allow"] = "deny"
    """deny: refuse new calls (503 audit_unavailable) while records cannot be taken; allow: serve them anyway."""
    retention: RetentionModel | None = None
    """How long records and bodies are kept, e.g. {records: 30d, bodies: 7d}."""


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
    """How ambiguous request paths are treated (README "How requests are normalized"). Exactly one file of a
    policy may hold it."""

    path_case: Literal["cautious", "sensitive", "insensitive"] = "cautious"
    """How rule paths compare with the request path: cautious (refuse both ways), sensitive, or insensitive."""
    escaped_slashes: Literal["reject", "keep", "decode"] = "reject"
    """%2F in a path: reject (400), keep (stays inside its segment), or decode (is a /)."""
    allow: list[Annotated[str, AfterValidator(_allow_form)]] = Field(default_factory=list)
    """Ambiguous forms let through: semicolon, backslash, trailing_dot, trailing_space, double_encoding."""


class PolicyFile(Strict):
    """A Bastion rules file. Several files merge into one policy: agents, users, rules, budgets, guards and
    network allowances from all of them; defaults, audit, approvals and normalize from exactly one."""

    version: Literal[1]
    """The rules format version: 1."""
    defaults: Defaults | None = None
    """{effect: deny} (recommended) or {effect: allow}, and the mode; required in exactly one file of a policy."""
    agents: dict[str, AgentModel] = Field(default_factory=dict)
    """Agents by name (1-128 letters, digits and _ . @ -): {support-bot: {roles: [support], token_sha256: ...}}."""
    users: dict[str, UserModel] = Field(default_factory=dict)
    """People by name: approvals, admin API, dashboard; e.g. {carol: {roles: [approver], token_sha256: ...}}."""
    rules: list[RuleModel] = Field(default_factory=list)
    """The rules; the decision is the strongest effect of all matching rules (deny > hold > allow > defaults)."""
    budgets: list[BudgetModel] = Field(default_factory=list)
    """Calls or LLM tokens per window, shared by the fleet, e.g. {id: llm-tokens, limit: {tokens: 200000, per: 1h}}."""
    guards: list[GuardModel] = Field(default_factory=list)
    """Automatic pauses of runaway agents, e.g. {id: deny-storm, when: {denials: 20, per: 1m}}."""
    network: NetworkModel | None = None
    """{allow_private: [CIDR, ...]}: private networks upstreams may be reached on."""
    audit: AuditModel | None = None
    """Audit log settings: body size, extra redaction, retention, on_failure (one file of a policy)."""
    approvals: ApprovalsModel | None = None
    """Fleet-wide approval settings: webhook, link, max_open_per_minute (one file of a policy)."""
    normalize: NormalizeModel | None = None
    """How ambiguous request paths are treated: path_case, escaped_slashes, allow (one file of a policy)."""
