"""Policy authors' commands: `check`, `explain`, `test`, `diff`, `token`, `schema`.

Exit codes (README, "Configuration reference"): `check` 0 ok / 3 invalid; `explain` 0 allow / 2 deny or
hold / 3 invalid policy; `test` 0 all pass / 1 any failure / 3 invalid policy; `diff` 0 no semantic change /
1 changes / 3 invalid policy; `schema` 0. Problems are printed as `FILE:LINE: [code] message` (the codes:
docs/policy-errors.md), never as a traceback.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from bastion.config import resolve_rules
from bastion.policy.engine import Policy
from bastion.policy.load import PolicyLoadError, load_policy, name_problem

EXIT_OK, EXIT_FAIL, EXIT_REFUSED, EXIT_INVALID = 0, 1, 2, 3


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="validate rules (exit 0 ok, 3 invalid)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="rules file or directory")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser("explain", help="show how the rules decide one request (exit 0 allow, 2 deny/hold)")
    p.add_argument("--rules", action="append", metavar="PATH", help="rules file or directory (BASTION_RULES)")
    p.add_argument("--agent", required=True, help="the calling agent")
    p.add_argument("method", help="HTTP method")
    p.add_argument("url", help="absolute URL, like https://api.openai.com/v1/chat/completions")
    p.add_argument("--body", help="request body: JSON text, or @FILE")
    p.add_argument("--header", action="append", default=[], metavar="'K: V'", help="request header; repeatable")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_explain)

    p = sub.add_parser("test", help="run YAML policy tests (exit 0 all pass, 1 any failure)")
    p.add_argument("--rules", action="append", metavar="PATH", help="rules file or directory (BASTION_RULES)")
    p.add_argument("--require-all-rules", action="store_true",
                   help="fail (exit 1) when a rule matched in no test case, naming each such rule; without it "
                        "they are only listed")
    p.add_argument("files", nargs="+", metavar="TESTFILE")
    p.set_defaults(handler=cmd_test)

    p = sub.add_parser("diff", help="what changed in meaning between two policies (exit 0 same, 1 changed)")
    p.add_argument("old", metavar="OLD", help="rules file or directory before the change")
    p.add_argument("new", metavar="NEW", help="rules file or directory after the change")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser("token", help="make a new random token and the YAML line holding its sha256")
    p.add_argument("name", type=_agent_or_user_name,
                   help="agent or user name: 1-128 letters, digits and _ . @ -, starting with a letter or digit")
    p.set_defaults(handler=cmd_token)

    p = sub.add_parser("schema", help="print the JSON Schema of rules files, for editors (exit 0)")
    p.add_argument("--output", metavar="FILE", help="write it to FILE instead of stdout")
    p.set_defaults(handler=cmd_schema)


def _agent_or_user_name(text: str) -> str:
    """Only a name the rules accept gets a token line (argparse prints the reason and exits 2)."""
    problem = name_problem("agent or user", text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _load(paths: list[str]) -> Policy | None:
    try:
        return load_policy(paths)
    except PolicyLoadError as e:
        for issue in e.issues:
            print(issue.coded(), file=sys.stderr)
        print(f"policy invalid: {len(e.issues)} problem(s)", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.paths)
    except PolicyLoadError as e:
        if args.format == "json":
            print(json.dumps({"ok": False, "errors": [i.to_json() for i in e.issues]}))
        else:
            for issue in e.issues:
                print(issue.coded())
            print(f"invalid: {len(e.issues)} problem(s)", file=sys.stderr)
        return EXIT_INVALID
    if args.format == "json":
        print(json.dumps({"ok": True, "revision": policy.revision, "files": list(policy.sources),
                          "rules": len(policy.rules), "agents": len(policy.agents), "users": len(policy.users)}))
    else:
        print(f"ok: {len(policy.sources)} file(s), {len(policy.rules)} rule(s), {len(policy.agents)} agent(s), "
              f"{len(policy.users)} user(s); revision {policy.revision[:12]}")
    return EXIT_OK


def _parse_headers(raw: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for h in raw:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"bad --header {h!r}: expected 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers


def cmd_explain(args: argparse.Namespace) -> int:
    paths = resolve_rules(args.rules)
    policy = _load(paths)
    if policy is None:
        return EXIT_INVALID
    try:
        headers = _parse_headers(args.header)
        body: bytes | None = None
        if args.body is not None:
            body = Path(args.body[1:]).read_bytes() if args.body.startswith("@") else args.body.encode()
            headers.setdefault("content-type", "application/json")
        from bastion.policy.facts import RequestFacts
        from bastion.policy.testing import check_jsonrpc

        facts = check_jsonrpc(RequestFacts.from_url(args.method, args.url, headers=headers, body=body,
                                                    normalize=policy.normalize))
    except (ValueError, OSError) as e:
        print(f"explain: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.agent not in policy.agents:
        print(f"explain: agent {args.agent!r} is not defined in the policy "
              f"(agents: {', '.join(sorted(policy.agents)) or 'none'})", file=sys.stderr)
        return EXIT_FAIL
    d = policy.explain(facts, args.agent)
    if args.format == "json":
        print(json.dumps(d.to_json(), indent=2))
    else:
        _print_explanation(d, facts, args)
    return EXIT_OK if d.effect == "allow" else EXIT_REFUSED


def _print_explanation(d: Any, facts: Any, args: argparse.Namespace) -> None:
    print(f"request: {args.agent} {facts.method} {facts.scheme}://{facts.host}:{facts.port}{facts.path}")
    for t in d.trace:
        mark = "ERROR" if t.error and t.matched else ("MATCH" if t.matched else "no   ")
        print(f"  {mark} {t.rule} ({t.effect})")
        for reason in t.reasons:
            print(f"          {reason}")
    for err in d.errors:
        print(f"  error: {err}")
    if d.reason == "default":
        how = f"no rule matched: defaults.effect is {d.would_effect}"
    elif d.reason == "rule":
        how = f"strongest matched effect is {d.would_effect} (deny > hold > allow), from {', '.join(d.rules)}"
    else:
        how = d.message or d.reason
    print(f"decision: {d.effect}  ({how})")
    if d.mode == "report":
        print(f"mode: report: the call goes through; enforce mode would {d.would_effect} it")
    if d.message:
        print(f"message: {d.message}")
    for lk in d.locks:
        print(f"lock: {lk.key} (ttl {lk.ttl:g}s, rule {lk.rule})")
    for r in d.releases:
        print(f"release: {r.key} (rule {r.rule})")
    if d.approval:
        groups = " and ".join("any of " + ", ".join(g) for g in d.approval.approvers)
        print(f"approval: {groups}; agent waits {d.approval.wait:g}s, expires after {d.approval.timeout:g}s")


def cmd_test(args: argparse.Namespace) -> int:
    from bastion.policy.testing import run_suites

    paths = resolve_rules(args.rules)
    policy = _load(paths)
    if policy is None:
        return EXIT_INVALID
    report = run_suites(policy, [Path(f) for f in args.files], require_all_rules=args.require_all_rules)
    for err in report.load_errors:
        print(err)
    for r in report.results:
        where = f"{r.file}:{r.line}" if r.line else r.file
        if r.passed:
            print(f"PASS {r.name}")
        else:
            print(f"FAIL {r.name}  ({where})")
            for p in r.problems:
                print(f"     {p}")
    if report.unexercised:
        print(f"rules no test exercised: {', '.join(report.unexercised)}")
        if args.require_all_rules:
            print(f"FAIL --require-all-rules: {len(report.unexercised)} rule(s) matched in no test case: "
                  f"{', '.join(report.unexercised)}; add a case that reaches each")
    passed = sum(r.passed for r in report.results)
    failed = len(report.results) - passed
    print(f"policy tests: {passed} passed, {failed} failed")
    if not report.results and not report.load_errors:
        print("no test cases found", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_diff(args: argparse.Namespace) -> int:
    """Both sides are validated first (every problem of both is shown): a diff of an invalid policy would
    describe rules the proxy refuses to load."""
    from bastion.policy.diff import diff_views, policy_view, render_text
    from bastion.policy.load import parsed_files

    old, new = _load([args.old]), _load([args.new])
    if old is None or new is None:
        return EXIT_INVALID
    d = diff_views(policy_view(old, parsed_files([args.old]), [args.old]),
                   policy_view(new, parsed_files([args.new]), [args.new]))
    # default=str: a YAML date in a condition is a date, and shows as one
    print(json.dumps(d.to_json(), indent=2, default=str) if args.format == "json" else "\n".join(render_text(d)))
    return EXIT_FAIL if d.changed else EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    token = "bst_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(token)
    print(f'{args.name}: {{token_sha256: "{digest}"}}')
    print(f"# line 1: the secret token, give it to {args.name} only; line 2: goes under `agents:` or `users:` "
          "in the rules", file=sys.stderr)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schema editors validate and complete rules files with (rules/bastion-rules.schema.json)."""
    from bastion.policy.jsonschema import schema_text

    text = schema_text()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK
