"""The JSON Schema (draft 2020-12) of a rules file, for editors: validation, completion and hover text as you type.

It is generated from the pydantic models in `schema.py`, so it follows them, and then post-processed, because
pydantic describes Python types, not what the loader accepts:

- Validators are functions pydantic cannot see into: `Duration` would read as a bare number, ids and tokens as
  any string, `limit` without its "exactly one of calls and tokens". Each validator of `schema.py` has its JSON
  Schema counterpart in `_VALIDATORS`; one without a counterpart stops generation, so a check added to the
  models cannot be forgotten here.
- Some checks run in the compiler (host and path patterns, conditions, key templates, agent and user names,
  network ranges, which keys go with which effect). Those JSON Schema can express are added here, with the
  compiler's wording as the editor's message (`patternErrorMessage` and `errorMessage` are read by the YAML
  language server and ignored by other validators). The patterns never refuse a string the loader accepts (a
  few accept more than it does); types are the canonical ones, where pydantic would also coerce ("443" for a
  port), and `match` keys are spelled as in YAML (`json`, not the model's `json_`).
- What needs the whole policy (undefined agents, roles and approvers, duplicate ids, captures a template uses,
  regexes that do not compile) stays with `bastion check`; tests/test_policy_schema.py lists each such case.
- Field titles derived from names are noise in an editor, null defaults say nothing, and a default of 900.0
  reads better as 15m.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic.json_schema import CoreRef, GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from bastion.policy.facts import ALLOWABLE_FORMS
from bastion.policy.matchers import OPERATORS
from bastion.policy.schema import NAME, RULE_ID, PolicyFile, parse_duration

SCHEMA_ID = "https://bastion.dev/schema/rules-v1.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

JsonDict = dict[str, Any]

# Patterns are written in the subset ECMA-262 (editors) and Python's `re` (tests, CLI validators) read alike.
_NAME_BODY = NAME.pattern.removeprefix("^").removesuffix("$")
_SELECTOR = rf"^(?:\*$|role:|{_NAME_BODY}$)"
_SHA256 = r"^\s*[0-9A-Fa-f]{64}\s*$"  # the loader strips and lower-cases before checking
# The loader drops every space inside a duration ("1h 30m", even "1 5m"), then reads NUMBER UNIT parts.
_DIGITS = "[0-9](?: *[0-9])*"
_DURATION = (rf"^\s*(?=[^1-9]*[1-9])"  # a non-zero digit somewhere: greater than zero
             rf"(?: *{_DIGITS}(?: *\. *{_DIGITS})? *(?:m *s|[smhd]))+ *\s*$")
_HOST_CHARS = "[A-Za-z0-9_.-]"
_SUFFIX_CHARS = r"[A-Za-z0-9_.\[\]-]"  # the suffix is canonicalized like a host: [example.com] reads as one
_HOST = (
    r"^\s*(?:"
    r"\[[^/@]*"  # a bracketed IPv6 literal
    r"|[^/@]*:[^/@]*:[^/@]*"  # an IPv6 literal (two or more colons)
    rf"|\*\.\s*(?={_SUFFIX_CHARS}*\.{_SUFFIX_CHARS}){_SUFFIX_CHARS}+\s*"  # *.example.com: a dot in the suffix
    rf"|(?!\.?\s*$){_HOST_CHARS}+\s*"  # api.example.com
    r"|(?:\*\.)?(?=[^*]*[^\x00-\x7F])[^*:/@]+"  # an internationalized name (IDNA decides the rest)
    r")$"
)
_CAPTURE = "[A-Za-z_][A-Za-z0-9_]*"
_SEGMENT = rf"(?:\{{{_CAPTURE}\}}|\*|(?!\.\.?(?:/|$))[^/?{{}}*]+)"
_PATH = (
    rf"^(?!.*/\{{({_CAPTURE})\}}/(?:.*/)?\{{\1\}}(?:/|$))"  # no capture twice
    rf"(?=/)(?:/+{_SEGMENT})*(?:/+\*\*)?/*$"  # starts with /, `**` only last
)
_JSON_SEGMENT = r"(?!\*(?:\.|\s*\}))[^{}.]*"  # a template's json path names one value: no `*` segment
_PLACEHOLDER = (
    rf"\{{\s*(?:{_CAPTURE}"
    r"|(?:query|header)\.[^{}]*[^\s{}]"
    rf"|json\.(?=[^{{}}]*[^\s{{}}]){_JSON_SEGMENT}(?:\.{_JSON_SEGMENT})*"
    r")\s*\}"
)
_TEMPLATE = rf"^(?:[^{{}}]|{_PLACEHOLDER})+$"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_CIDR = (
    rf"^(?:{_IPV4}(?:/(?:0*(?:3[0-2]|[12]?[0-9])|{_IPV4}))?"  # 10.0.0.0/8, 10.0.0.1, 10.0.0.0/255.0.0.0
    r"|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[^/]+)?(?:/0*(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"  # ::1/128
)
_JSON_PATH = r"^[^.]+(?:\.[^.]+)*$"
_METHOD = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"  # the loader upper-cases it: any case is fine
_SCHEME = "^(?:[Hh][Tt][Tt][Pp][Ss]?|[Ww][Ss][Ss]?)$"

_SCALAR: JsonDict = {"type": ["string", "number", "boolean", "null"]}
_NULL: JsonDict = {"type": "null"}


def _ref(name: str) -> JsonDict:
    return {"$ref": f"#/$defs/{name}"}


def _nullable(schema: JsonDict) -> JsonDict:
    return {"anyOf": [schema, _NULL]}


def _one_or_list(item: JsonDict) -> JsonDict:
    """A value or a non-empty list of them (the compiler refuses an empty list: it would match nothing)."""
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1}, _NULL]}


def _exactly_one(*keys: str) -> JsonDict:
    """Exactly one of `keys` is given (and not null): a model validator's rule, as JSON Schema."""
    return {"oneOf": [{"required": [k], "properties": {k: {"not": _NULL}}} for k in keys]}


_OPERATOR_SCHEMAS: dict[str, JsonDict] = {
    "eq": {**_SCALAR, "description": "Equal to this value."},
    "ne": {**_SCALAR, "description": "Not equal to this value."},
    "in": {"type": "array", "minItems": 1, "description": "Equal to one of these values, e.g. [gpt-4.1, o3]."},
    "not_in": {"type": "array", "minItems": 1, "description": "Equal to none of these values."},
    "gt": {"type": "number", "description": "Greater than this number."},
    "gte": {"type": "number", "description": "Greater than or equal to this number."},
    "lt": {"type": "number", "description": "Less than this number."},
    "lte": {"type": "number", "description": "Less than or equal to this number."},
    "prefix": {"type": "string", "description": "A string starting with this."},
    "suffix": {"type": "string", "description": "A string ending with this, e.g. \"@example.com\"."},
    "contains": {**_SCALAR, "description": "A string containing this text, or a list containing this value."},
    "regex": {"type": "string", "description": "A string this regex finds anywhere (anchor with ^...$)."},
    "exists": {"type": "boolean", "description": "true: the value is present; false: it is absent."},
}
assert tuple(_OPERATOR_SCHEMAS) == OPERATORS, "every compiler operator needs its schema, in the same order"

# Shared definitions, referenced from the models' properties below (`Duration` from the generator).
_DEFS: dict[str, JsonDict] = {
    "Duration": {
        "description": "A duration: a number with a unit (ms, s, m, h, d), like 30s, 15m, 1h30m or 500ms, or a "
                       "number of seconds; greater than zero.",
        "anyOf": [
            {"type": "string", "pattern": _DURATION,
             "patternErrorMessage": "a duration is a number with a unit, like 30s, 15m, 1h or 1h30m"},
            {"type": "number", "exclusiveMinimum": 0},
        ],
        "examples": ["30s", "15m", "1h", "7d"],
    },
    "AgentSelector": {
        "description": "An agent name, role:NAME (every agent with that role), or \"*\" (every agent).",
        "type": "string", "pattern": _SELECTOR,
        "patternErrorMessage": "an agent name (letters, digits and _ . @ -), role:NAME, or \"*\"",
    },
    "UserSelector": {
        "description": "A user name, role:NAME (every user with that role), or \"*\" (every user).",
        "type": "string", "pattern": _SELECTOR,
        "patternErrorMessage": "a user name (letters, digits and _ . @ -), role:NAME, or \"*\"",
    },
    "KeyTemplate": {
        "description": "A key template: text with {capture} (from match.path), {json.a.b}, {query.x}, {header.x-y} "
                       "or {agent}, e.g. ticket:{id}.",
        "type": "string", "pattern": _TEMPLATE,
        "patternErrorMessage": "a key template: text with {capture}, {json.a.b}, {query.x}, {header.x-y} or "
                               "{agent}, and balanced braces",
    },
    "HostPattern": {
        "description": "A host name (api.example.com) or *.example.com (any name below it, not the apex); no port.",
        "type": "string", "pattern": _HOST,
        "patternErrorMessage": "a host name like api.example.com or *.example.com: no port (use `port:`), no URL, "
                               "and a wildcard only as a leading *.",
    },
    "PathPattern": {
        "description": "A path starting with /: literal segments, {name} (one segment, captured), * (one "
                       "segment), ** (the rest, last only); e.g. /v1/tickets/{id}/**.",
        "type": "string", "pattern": _PATH,
        "patternErrorMessage": "a path starting with /, no query; {name}, * and ** are whole segments, ** only "
                               "last, no . or .. segments, no capture twice",
    },
    "Condition": {
        "description": "A value (equality) or an operator map whose operators must all hold, e.g. {gt: 5000}. A "
                       "list is ambiguous: write {in: [...]}.",
        "anyOf": [_SCALAR, _ref("Operators")],
    },
    "Operators": {
        "description": "Operators that must all hold: eq ne in not_in gt gte lt lte prefix suffix contains regex "
                       "exists.",
        "type": "object", "minProperties": 1, "additionalProperties": False, "properties": _OPERATOR_SCHEMAS,
    },
    "CallCondition": {
        "description": "A value, a list (any of) or an operator map, e.g. [openai, anthropic] or {prefix: gpt-}.",
        "anyOf": [_ref("Condition"), {"type": "array", "minItems": 1}],
    },
    "FieldConditions": {
        "description": "{name: CONDITION}: every named field must satisfy its condition.",
        "type": "object", "minProperties": 1, "propertyNames": {"minLength": 1},
        "additionalProperties": _ref("Condition"),
    },
    "PathConditions": {
        "description": "{dotted.path: CONDITION}: a.0.b indexes lists, * is any element; every path must satisfy "
                       "its condition.",
        "type": "object", "minProperties": 1, "propertyNames": {"pattern": _JSON_PATH},
        "additionalProperties": _ref("Condition"),
    },
}

# Counterparts of the validators in schema.py, by the validator's qualified name. A field validator's schema
# goes beside the field's type (keywords of another type are ignored, so a pattern also fits `str | None`); a
# model validator's goes into the model's schema.
_VALIDATORS: dict[str, JsonDict] = {
    "AgentModel._token": {"pattern": _SHA256, "patternErrorMessage": "64 hex characters: run `bastion token NAME`"},
    "UserModel._token": {"pattern": _SHA256, "patternErrorMessage": "64 hex characters: run `bastion token NAME`"},
    "RuleModel._id_format": {"pattern": RULE_ID.pattern,
                             "patternErrorMessage": "1-128 letters, digits and _ . : / -, starting with a letter "
                                                    "or digit"},
    "BudgetModel._id_format": {"pattern": RULE_ID.pattern,
                               "patternErrorMessage": "1-128 letters, digits and _ . : / -, starting with a "
                                                      "letter or digit"},
    "GuardModel._id_format": {"pattern": RULE_ID.pattern,
                              "patternErrorMessage": "1-128 letters, digits and _ . : / -, starting with a letter "
                                                     "or digit"},
    "CompleteModel._ttl": {"maximum": 30 * 86400},  # numbers only: a duration string cannot be bounded
    "BudgetLimitModel._per": {"minimum": 1, "maximum": 31 * 86400},
    "GuardWhenModel._per": {"minimum": 1, "maximum": 86400},
    "BudgetLimitModel._one_unit": _exactly_one("calls", "tokens"),
    "GuardWhenModel._one_rate": _exactly_one("denials", "errors", "calls"),
    "WebhookModel._url": {"pattern": r"^https?://[^\s/]+",
                          "patternErrorMessage": "an http:// or https:// URL that names a host"},
    "WebhookModel._env_name": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                               "patternErrorMessage": "the name of an environment variable (letters, digits, _), "
                                                      "not the secret itself"},
    "_allow_form": {"enum": list(ALLOWABLE_FORMS)},
}

# Properties whose type the compiler narrows, by (model, property): the schema replaces pydantic's type and
# keeps its description.
_PROPERTIES: dict[tuple[str, str], JsonDict] = {
    ("PolicyFile", "agents"): {"type": "object", "additionalProperties": _ref("AgentModel"),
                               "propertyNames": {"pattern": NAME.pattern}},
    ("PolicyFile", "users"): {"type": "object", "additionalProperties": _ref("UserModel"),
                              "propertyNames": {"pattern": NAME.pattern}},
    ("AgentModel", "owner"): _nullable({"type": "string", "pattern": NAME.pattern,
                                        "patternErrorMessage": "a user name defined under `users`"}),
    ("RuleModel", "agents"): {"type": "array", "items": _ref("AgentSelector"), "minItems": 1},
    ("BudgetModel", "agents"): {"type": "array", "items": _ref("AgentSelector"), "minItems": 1},
    ("GuardModel", "agents"): {"type": "array", "items": _ref("AgentSelector"), "minItems": 1},
    ("ApprovalModel", "approvers"): {"type": "array", "items": _ref("UserSelector"), "minItems": 1},
    ("RuleModel", "unless"): {"anyOf": [
        {"$ref": "#/$defs/MatchModel", "minProperties": 1},
        {"type": "array", "items": {"$ref": "#/$defs/MatchModel", "minProperties": 1}},
        _NULL,
    ]},
    ("RuleModel", "release"): {"anyOf": [_ref("KeyTemplate"), {"type": "array", "items": _ref("KeyTemplate")},
                                         _NULL]},
    ("RuleModel", "requires"): {"anyOf": [_ref("KeyTemplate"), {"type": "array", "items": _ref("KeyTemplate")},
                                          _NULL]},
    ("LockModel", "key"): _ref("KeyTemplate"),
    ("CompleteModel", "key"): _ref("KeyTemplate"),
    ("BudgetModel", "key"): _ref("KeyTemplate"),
    ("MatchModel", "host"): _one_or_list(_ref("HostPattern")),
    ("MatchModel", "port"): _one_or_list({"type": "integer", "minimum": 1, "maximum": 65535}),
    ("MatchModel", "scheme"): _one_or_list({"anyOf": [
        {"enum": ["http", "https", "ws", "wss"]},
        {"type": "string", "pattern": _SCHEME, "patternErrorMessage": "http, https, ws or wss"},
    ]}),
    ("MatchModel", "method"): _one_or_list({
        "type": "string", "pattern": _METHOD, "patternErrorMessage": "an HTTP method, like GET or POST",
        "examples": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]}),
    ("MatchModel", "path"): _one_or_list(_ref("PathPattern")),
    ("MatchModel", "query"): _nullable(_ref("FieldConditions")),
    ("MatchModel", "headers"): _nullable(_ref("FieldConditions")),
    ("MatchModel", "json"): _nullable(_ref("PathConditions")),
    ("LlmMatchModel", "provider"): {**_ref("CallCondition"), "examples": ["openai", "anthropic"]},
    ("LlmMatchModel", "api"): {**_ref("CallCondition"),
                               "examples": ["chat.completions", "completions", "responses", "embeddings",
                                            "messages"]},
    ("LlmMatchModel", "model"): _ref("CallCondition"),
    ("LlmMatchModel", "tool"): _ref("CallCondition"),
    ("McpMatchModel", "method"): {**_ref("CallCondition"),
                                  "examples": ["tools/call", "tools/list", "resources/read", "prompts/get",
                                               "initialize"]},
    ("McpMatchModel", "tool"): _ref("CallCondition"),
    ("McpMatchModel", "resource"): _ref("CallCondition"),
    ("McpMatchModel", "args"): _nullable(_ref("PathConditions")),
    ("NetworkModel", "allow_private"): {"type": "array", "items": {
        "type": "string", "pattern": _CIDR,
        "patternErrorMessage": "an IP network like 10.0.0.0/8 or ::1/128 (or one address)"}},
}


def _only_null(message: str) -> JsonDict:
    return {"type": "null", "errorMessage": message}


def _no_list(message: str) -> JsonDict:
    """Absent, null or an empty list (the compiler tests these keys for truth)."""
    return {"type": ["null", "array"], "maxItems": 0, "errorMessage": message}


def _effect_is(*effects: str) -> JsonDict:
    return {"properties": {"effect": {"enum": list(effects)}}, "required": ["effect"]}


# Which keys go with which effect (the compiler's checks in `_compile_rule`).
_RULE_EFFECTS: list[JsonDict] = [
    {"if": _effect_is("allow", "deny"),
     "then": {"properties": {"approval": _only_null("`approval` only belongs on a rule with effect: hold")}}},
    {"if": _effect_is("deny"),
     "then": {"properties": {
         "lock": _only_null("a deny rule cannot take or release a lock"),
         "release": _no_list("a deny rule cannot take or release a lock"),
         "requires": _no_list("a deny rule cannot require or complete a milestone"),
         "complete": _no_list("a deny rule cannot require or complete a milestone"),
     }}},
    {"if": _effect_is("allow"),
     "then": {"properties": {
         "message": _only_null("`message` is shown to agents on refusals; an allow rule never shows it")}}},
]


class _Generator(GenerateJsonSchema):
    """pydantic's generator, with each validator function replaced by its JSON Schema counterpart."""

    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> JsonSchemaValue:
        if schema["function"]["function"] is parse_duration:
            defs_ref, ref = self.get_cache_defs_ref_schema(CoreRef("Duration"))
            self.definitions[defs_ref] = copy.deepcopy(_DEFS["Duration"])
            return ref
        return {**super().function_before_schema(schema), **_counterpart(schema)}

    def function_after_schema(self, schema: core_schema.AfterValidatorFunctionSchema) -> JsonSchemaValue:
        return {**super().function_after_schema(schema), **_counterpart(schema)}


def _counterpart(schema: Any) -> JsonDict:
    name = getattr(schema["function"]["function"], "__qualname__", repr(schema["function"]["function"]))
    if name not in _VALIDATORS:
        raise LookupError(f"validator {name} in bastion/policy/schema.py has no JSON Schema counterpart: add it to "
                          "_VALIDATORS in bastion/policy/jsonschema.py (an empty dict if none can be written)")
    return copy.deepcopy(_VALIDATORS[name])


def _duration_text(seconds: float) -> str:
    """900.0 -> 15m, 5400.0 -> 1h30m: defaults as people write them."""
    ms = round(seconds * 1000)
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)


def _refers_to(schema: JsonDict, name: str) -> bool:
    target = f"#/$defs/{name}"
    return schema.get("$ref") == target or any(s.get("$ref") == target for s in schema.get("anyOf", ()))


def _tidy_properties(model: str, node: JsonDict) -> None:
    for prop, schema in node.get("properties", {}).items():
        schema.pop("title", None)
        if "default" in schema and schema["default"] is None:
            del schema["default"]
        if _refers_to(schema, "Duration") and isinstance(schema.get("default"), (int, float)):
            schema["default"] = _duration_text(schema["default"])
        narrowed = _PROPERTIES.get((model, prop))
        if narrowed is not None:
            kept = {k: schema[k] for k in ("description", "default") if k in schema}
            node["properties"][prop] = {**copy.deepcopy(narrowed), **kept}


def _sorted(value: Any, parent: str | None = None) -> Any:
    """Keys in alphabetical order, except property and definition names (in the models' order)."""
    if isinstance(value, dict):
        keys = list(value) if parent in ("properties", "$defs") else sorted(value)
        return {k: _sorted(value[k], k) for k in keys}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def build_schema() -> JsonDict:
    """The JSON Schema of one rules file, as a dict."""
    raw = PolicyFile.model_json_schema(mode="validation", schema_generator=_Generator)
    defs: dict[str, JsonDict] = raw.pop("$defs")
    _tidy_properties("PolicyFile", raw)
    for name, node in defs.items():
        _tidy_properties(name, node)
        if "description" in node:  # a wrapped class docstring: one line for hover text
            node["description"] = " ".join(node["description"].split())
        if node.get("title", "").endswith("Model"):
            node["title"] = node["title"].removesuffix("Model")
    defs["RuleModel"]["allOf"] = copy.deepcopy(_RULE_EFFECTS)
    for name, node in _DEFS.items():
        defs.setdefault(name, copy.deepcopy(node))
    referenced = json.dumps([raw, defs])
    missing = [name for name in defs if f'"#/$defs/{name}"' not in referenced]
    if missing:
        raise LookupError(f"unused definitions: {missing}")
    raw.pop("title", None)
    head = {"$schema": DIALECT, "$id": SCHEMA_ID, "title": "Bastion rules file"}
    body = _sorted(raw)
    return {**head, **body, "$defs": _sorted(dict(sorted(defs.items())), "$defs")}


def schema_text() -> str:
    """The schema as `bastion schema` prints it and rules/bastion-rules.schema.json holds it."""
    return json.dumps(build_schema(), indent=2) + "\n"
