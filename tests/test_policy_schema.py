"""The JSON Schema editors use for rules files (`bastion schema`, rules/bastion-rules.schema.json).

An editor's schema has to be right both ways: flag what `bastion check` refuses, while typing, and never flag
what it accepts. So every policy the repository ships must validate, every invalid policy of
tests/testdata/policy/invalid must be refused (save the few that need the whole policy, listed with the
reason), and the patterns that mirror the compiler's checks are tried against the compiler itself.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.cli import main
from bastion.policy import schema as models
from bastion.policy.jsonschema import _VALIDATORS, SCHEMA_ID, build_schema, schema_text
from bastion.policy.matchers import CompileError, compile_host, compile_path
from bastion.policy.templates import compile_template

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "rules" / "bastion-rules.schema.json"
REGENERATE = ".venv/bin/bastion schema --output rules/bastion-rules.schema.json"
TESTDATA = REPO / "tests" / "testdata" / "policy"
INVALID = sorted((TESTDATA / "invalid").glob("*.yaml"))
POLICIES = sorted(
    [p for p in (REPO / "rules" / "examples").glob("*.yaml") if not p.name.endswith("_test.yaml")]
    + [REPO / "rules" / "default.yaml"] + list(TESTDATA.glob("*.yaml")))
MODELINED = [p for p in POLICIES if p.parent != TESTDATA]  # what users copy: it names the schema for editors

# Invalid policies no JSON Schema of one file can refuse, and why. The schema must accept each of them (so a
# case it learns to refuse leaves this list) and `bastion check` must refuse each (exit 3).
NEEDS_THE_WHOLE_POLICY = {
    "undefined_agent": "an agent name is only known to be undefined by looking at `agents` (in any file)",
    "undefined_role": "whether some agent has a role depends on every agent of the policy",
    "undefined_approver": "whether some user has a role depends on every user of the policy",
    "duplicate_rule": "ids unique across rules and files: JSON Schema's uniqueItems compares whole items",
    "missing_defaults": "`defaults` may sit in another file of the same policy",
    "bad_template": "whether {ticket} is captured depends on the same rule's `match.path`",
    "bad_regex": "JSON Schema cannot test that a string compiles as a (Python) regex",
    "duplicate_key": "YAML loaders keep the last duplicate key: the schema never sees the first",
    "yaml_syntax": "not YAML at all: there is nothing to apply a schema to",
}
NOT_YAML = {"yaml_syntax"}


def shipped() -> dict[str, Any]:
    return json.loads(SHIPPED.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(shipped())


def policy(**rule: Any) -> dict[str, Any]:
    """A one-rule policy around `rule` (the rule's required keys filled in)."""
    return {"version": 1, "defaults": {"effect": "deny"}, "agents": {"a": {}},
            "rules": [{"id": "r", "effect": "allow", "agents": ["a"], **rule}]}


def test_shipped_schema_is_what_bastion_schema_prints() -> None:
    assert SHIPPED.read_text() == schema_text(), (
        f"rules/bastion-rules.schema.json is out of date: run `{REGENERATE}`")


def test_bastion_schema_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == schema_text()
    out = tmp_path / "rules.schema.json"
    assert main(["schema", "--output", str(out)]) == 0
    assert out.read_text() == schema_text()
    assert capsys.readouterr().out == ""


def test_is_a_valid_2020_12_schema() -> None:
    schema = shipped()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == SCHEMA_ID
    assert schema["title"] and schema["required"] == ["version"]
    assert schema["properties"]["version"]["const"] == 1


def test_generation_is_stable() -> None:
    assert schema_text() == schema_text()
    assert json.dumps(build_schema(), indent=2) + "\n" == schema_text()


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_policies_validate(path: Path, validator: jsonschema.Draft202012Validator) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_policies_are_refused(path: Path, validator: jsonschema.Draft202012Validator,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    if path.stem in NOT_YAML:
        with pytest.raises(yaml.YAMLError):
            yaml.safe_load(path.read_text())
    elif path.stem in NEEDS_THE_WHOLE_POLICY:
        assert validator.is_valid(yaml.safe_load(path.read_text())), (
            f"the schema now refuses {path.name}: remove it from NEEDS_THE_WHOLE_POLICY")
    else:
        assert not validator.is_valid(yaml.safe_load(path.read_text())), (
            f"the schema accepts {path.name}, which `bastion check` refuses")
    assert main(["check", str(path)]) == 3
    capsys.readouterr()


def test_whole_policy_list_names_real_files() -> None:
    assert set(NEEDS_THE_WHOLE_POLICY) <= {p.stem for p in INVALID}
    assert set(NEEDS_THE_WHOLE_POLICY) >= NOT_YAML


@pytest.mark.parametrize("path", MODELINED, ids=lambda p: str(p.relative_to(REPO)))
def test_policies_name_the_schema_on_their_first_line(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    assert (path.parent / first.removeprefix(prefix)).resolve() == SHIPPED


# ---------------------------------------------------------------------------------------------------------
# What an editor shows


def test_unknown_keys_are_refused(validator: jsonschema.Draft202012Validator) -> None:
    assert not validator.is_valid({"version": 1, "rule": []})
    assert not validator.is_valid(policy(mach={"host": "example.com"}))
    assert not validator.is_valid(policy(match={"hots": "example.com"}))
    assert not validator.is_valid(policy(match={"llm": {"modle": "gpt-4.1"}}))
    assert not validator.is_valid(policy(lock={"key": "k", "ttl": "1m", "tll": "2m"}))


def test_json_is_spelled_as_in_yaml(validator: jsonschema.Draft202012Validator) -> None:
    assert validator.is_valid(policy(match={"json": {"amount": {"gt": 5}}}))
    assert not validator.is_valid(policy(match={"json_": {"amount": {"gt": 5}}}))


@pytest.mark.parametrize("ttl", ["90s", 90, 0.5, "1h30m", "1h 30m", "500ms", " 2d ", "1.5h"])
def test_durations_accepted(ttl: Any, validator: jsonschema.Draft202012Validator) -> None:
    models.parse_duration(ttl)
    assert validator.is_valid(policy(match={"path": "/t/{id}"}, lock={"key": "t:{id}", "ttl": ttl}))


@pytest.mark.parametrize("ttl", ["soon", "15 minutes", "0s", 0, -5, True, "", "1x", "h"])
def test_durations_refused(ttl: Any, validator: jsonschema.Draft202012Validator) -> None:
    with pytest.raises(ValueError):
        models.parse_duration(ttl)
    assert not validator.is_valid(policy(match={"path": "/t/{id}"}, lock={"key": "t:{id}", "ttl": ttl}))


def test_duration_bounds_on_numbers(validator: jsonschema.Draft202012Validator) -> None:
    def budget(per: Any) -> dict[str, Any]:
        return {"version": 1, "budgets": [{"id": "b", "limit": {"calls": 5, "per": per}}]}

    assert validator.is_valid(budget(3600)) and validator.is_valid(budget("1h"))
    assert not validator.is_valid(budget(0.5))
    assert not validator.is_valid(budget(32 * 86400))


def test_keys_that_go_with_an_effect(validator: jsonschema.Draft202012Validator) -> None:
    assert validator.is_valid(policy(effect="hold", approval={"wait": "10s"}))
    assert not validator.is_valid(policy(effect="deny", approval={"wait": "10s"}))
    assert validator.is_valid(policy(approval=None))
    assert not validator.is_valid(policy(effect="deny", lock={"key": "k"}))
    assert not validator.is_valid(policy(effect="deny", requires="done:x"))
    assert validator.is_valid(policy(effect="deny", requires=[]))
    assert not validator.is_valid(policy(message="never shown"))
    assert validator.is_valid(policy(effect="deny", message="no"))


def test_exactly_one_rate(validator: jsonschema.Draft202012Validator) -> None:
    def guard(**when: Any) -> dict[str, Any]:
        return {"version": 1, "guards": [{"id": "g", "when": {"per": "1m", **when}}]}

    assert validator.is_valid(guard(denials=20))
    assert validator.is_valid(guard(denials=20, errors=None))
    assert not validator.is_valid(guard())
    assert not validator.is_valid(guard(denials=20, calls=100))


def test_main_fields_are_described() -> None:
    schema = shipped()
    defs = schema["$defs"]
    rule = defs["RuleModel"]["properties"]
    for field in (schema["properties"]["rules"], schema["properties"]["agents"], rule["effect"], rule["match"]):
        assert len(field["description"]) > 20, field
    assert "deny" in rule["effect"]["description"]


def test_every_model_and_field_is_described() -> None:
    schema = shipped()
    undescribed = [name for name, d in schema["$defs"].items() if not d.get("description")]
    for name, node in [("PolicyFile", schema), *schema["$defs"].items()]:
        undescribed += [f"{name}.{p}" for p, s in node.get("properties", {}).items() if not s.get("description")]
    assert not undescribed


def test_defaults_are_valid_values() -> None:
    """Editors insert defaults on completion: each must pass its own property's schema (15m, not 900.0)."""
    schema = shipped()
    checked = 0
    for node in [schema, *schema["$defs"].values()]:
        for name, prop in node.get("properties", {}).items():
            if "default" in prop:
                one = {**copy.deepcopy(prop), "$defs": schema["$defs"]}
                assert jsonschema.Draft202012Validator(one).is_valid(prop["default"]), (name, prop["default"])
                checked += 1
    assert checked > 10
    assert schema["$defs"]["LockModel"]["properties"]["ttl"]["default"] == "15m"


def test_every_validator_has_a_counterpart() -> None:
    """build_schema() refuses a validator missing from _VALIDATORS; this catches entries left behind."""
    names = set()
    for model in vars(models).values():
        if isinstance(model, type) and issubclass(model, models.BaseModel) and model is not models.BaseModel:
            decorators = model.__pydantic_decorators__
            for kind in (decorators.field_validators, decorators.model_validators):
                names |= {f"{model.__name__}.{name}" for name in kind}
    assert set(_VALIDATORS) - {"_allow_form"} == names


# ---------------------------------------------------------------------------------------------------------
# The patterns never refuse what the compiler accepts


def _accepted(check: Any, value: Any) -> bool:
    try:
        check(value)
    except (CompileError, ValueError):
        return False
    return True


HOSTS = st.text("abZ09.-_*:[]/@ é。\t", max_size=12) | st.sampled_from(
    ["api.example.com", "*.example.com", "*.com", "::1", "[::1]", "bücher.de", "example.com:8443", "a.*.b"])
PATHS = st.text("/ab{}*.?_x1", max_size=14) | st.sampled_from(["/t/{id}/**", "/{a}/{a}", "/a/./b", "/a/**/b"])
TEMPLATES = st.text("{}ajsonquery.header*_ 1:", max_size=16) | st.sampled_from(
    ["t:{id}", "{json.a.*}", "{json.a.b}", "{query.x}", "{agent}", "{ x }", "x}"])
DURATIONS = st.text("0123.msmhd \t", max_size=8)
NETWORKS = st.text("0123458.:/f%e", max_size=16) | st.sampled_from(
    ["10.0.0.0/8", "10.0.0.0/33", "::1/128", "fe80::1%eth0/64", "10.0.0.0/255.0.0.0", "010.0.0.0/8"])
SOUND = settings(max_examples=300, deadline=None)


@SOUND
@given(host=HOSTS)
def test_host_pattern_is_sound(host: str, validator: jsonschema.Draft202012Validator) -> None:
    if _accepted(compile_host, host):
        assert validator.is_valid(policy(match={"host": host}))


@SOUND
@given(path=PATHS)
def test_path_pattern_is_exact(path: str, validator: jsonschema.Draft202012Validator) -> None:
    assert validator.is_valid(policy(match={"path": path})) == _accepted(compile_path, path)


@SOUND
@given(template=TEMPLATES)
def test_template_pattern_is_exact(template: str, validator: jsonschema.Draft202012Validator) -> None:
    """Captures the path does not make are the compiler's to find: the path here captures nothing."""
    assert validator.is_valid(policy(effect="hold", release=template)) == _accepted(compile_template, template)


@SOUND
@given(text=DURATIONS)
def test_duration_pattern_is_exact(text: str, validator: jsonschema.Draft202012Validator) -> None:
    valid = validator.is_valid(policy(match={"path": "/t/{id}"}, lock={"key": "t:{id}", "ttl": text}))
    assert valid == _accepted(models.parse_duration, text)


@SOUND
@given(network=NETWORKS)
def test_network_pattern_is_sound(network: str, validator: jsonschema.Draft202012Validator) -> None:
    if _accepted(lambda n: ipaddress.ip_network(n, strict=False), network):
        assert validator.is_valid({"version": 1, "network": {"allow_private": [network]}})
