"""Pydantic's validation errors of a rules file, worded for policy authors and given a stable code.

Pydantic reports `{"type": "extra_forbidden", "loc": ("rules", 0, "mach"), ...}`; a policy author needs
`unknown key 'mach' (did you mean 'match'?)`, and tools need a code that does not change when the wording does
(docs/policy-errors.md). The wording walks the models of `schema.py` (the keys allowed where a typo sits), so
it lives beside them rather than in the loader.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

import pydantic

from bastion.policy.schema import PolicyFile, PolicyValueError

# Pydantic error types that mean "this is not the kind of value the key takes" (a string where a list belongs).
# Other constraint failures (too large, too long, not one of the allowed values) are `bad_value`.
_TYPE_SUFFIXES = ("_type", "_parsing")


def explain_pydantic(err: Any) -> tuple[str, str]:
    """`(code, message)` for one error of `ValidationError.errors()` on a `PolicyFile`."""
    loc = err["loc"]
    where = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = known_keys(loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else (f"; expected one of: {', '.join(known)}"
                                                              if known else "")
        return "unknown_key", f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "missing_key", f"{where}: required"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return "bad_value", f"{where}: expected {expected}, got {err.get('input')!r}"
    msg = err["msg"]
    if kind == "string_type" and isinstance(err.get("input"), bool):
        return "yaml_boolean", (f"{where}: expected a string, got {err['input']!r}: YAML reads "
                                "yes/no/on/off/true/false as booleans, so quote the value")
    code = "wrong_type" if kind.endswith(_TYPE_SUFFIXES) else "bad_value"
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, PolicyValueError):
        code = cause.code
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return code, f"{where}: {msg}" if where else msg


def known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc`, found by walking the models along the path."""
    model: Any = PolicyFile
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            model = None
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(str(part))
        if f is None:
            continue  # a dict key (agent or user name): stay on the value model
        model = _inner_model(f.annotation)
    if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []


def _inner_model(annotation: Any) -> Any:
    """The first model class inside an annotation (`list[RuleModel] | None` -> RuleModel), or None."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
