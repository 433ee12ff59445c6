"""The public contract under docs/ stays in step with the code: every CLI command and option, every metric, every
`error.type` an agent or an admin API client can get, and every link between the pages.

Fast and offline: it reads the argparse parser, the metrics registry and the source, never starts a server.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCE = ROOT / "bastion"


def _text(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


# -- (a) the CLI -------------------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command as (("approvals", "approve"), its parser), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _prose(markdown: str) -> str:
    """`markdown` without its fenced code blocks, whose `# comments` are not headings."""
    return re.sub(r"^```.*?^```[^\n]*$", "", markdown, flags=re.MULTILINE | re.DOTALL)


def _sections(markdown: str) -> dict[str, str]:
    """Heading text (backticks removed) -> the text up to the next heading of any level."""
    out: dict[str, str] = {}
    parts = re.split(r"^(#{1,6} .*)$", _prose(markdown), flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        out[heading.lstrip("#").strip().replace("`", "")] = body
    return out


def _mentions(text: str, option: str) -> bool:
    """`option` appears as a whole word: `-n` is not found inside `--name`."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_cli_command_and_option_is_documented() -> None:
    from bastion.cli import build_parser

    commands = list(_commands(build_parser()))
    assert len(commands) > 20, "the parser walk found too few commands: did build_parser() change shape?"
    sections = _sections(_text("cli.md"))
    missing: list[str] = []
    for path, parser in commands:
        title = "bastion " + " ".join(path)
        section = sections.get(title)
        if section is None:
            missing.append(f"no heading `### {title}` in docs/cli.md")
            continue
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or has_subcommands:
                continue
            for option in action.option_strings:
                if not _mentions(section, option):
                    missing.append(f"option {option} of `{title}` is not in its section `### {title}` of "
                                   "docs/cli.md")
    assert not missing, "docs/cli.md is behind the parser (bastion/cli.py build_parser()):\n" + "\n".join(missing)


# -- (b) metrics -------------------------------------------------------------------------------------------------

_METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def _declared_metrics() -> set[str]:
    """Metric names declared anywhere in bastion/ (`Counter("bastion_x", ...)`), parsed from the source."""
    found: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if name in _METRIC_TYPES and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def _registered_metrics() -> set[str]:
    """Metric family names in Bastion's registry (prometheus_client strips a counter's `_total`)."""
    from bastion import metrics

    return {family.name for family in metrics.REGISTRY.collect()}


def _base(name: str) -> str:
    return re.sub(r"_(total|bucket|sum|count|created)$", "", name)


def test_every_metric_is_documented() -> None:
    registered = _registered_metrics()
    declared = _declared_metrics()
    assert {"bastion_requests", "bastion_refusals", "bastion_audit_backlog"} <= registered, registered
    names = {_base(n) for n in registered | declared}
    text = _text("metrics.md")
    missing = [n for n in sorted(names)
               if re.search(rf"(?<![\w]){re.escape(n)}(?:_total|_bucket|_sum|_count)?(?![\w])", text) is None]
    assert not missing, ("metrics declared in bastion/ (bastion/metrics.py) but missing from docs/metrics.md; add a "
                         "row (name, type, labels, meaning) to its tables: " + ", ".join(missing))


def test_documented_metrics_exist() -> None:
    """No row for a metric the code no longer has."""
    names = {_base(n) for n in _registered_metrics() | _declared_metrics()}
    documented = {_base(m) for m in re.findall(r"^\| `(bastion_[a-z0-9_]+)`", _text("metrics.md"), re.MULTILINE)}
    stale = sorted(documented - names)
    assert not stale, "docs/metrics.md documents metrics the code does not declare: " + ", ".join(stale)


# -- (c) error.type values -----------------------------------------------------------------------------------------

# The functions that build a refusal, and the position of their `error_type` argument.
_BUILDERS = {"refuse": 2, "make_error": 1, "json_error": 1, "FleetError": 1, "error_body": 0}


def _module_constants() -> dict[str, dict[str, str]]:
    """Module name (e.g. "responses") -> its module-level `NAME = "text"` constants."""
    out: dict[str, dict[str, str]] = {}
    for path in SOURCE.rglob("*.py"):
        consts: dict[str, str] = {}
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                consts[node.targets[0].id] = node.value.value
        out.setdefault(path.stem, {}).update(consts)
    return out


def _error_types() -> set[str]:
    """Every `error.type` value the proxy and the admin listener can answer with, read from the source:
    the error-type argument of each refusal builder, resolved through module constants; the `kind` mappings
    of the admin API; and `{"type": "error", "error": {"type": ...}}` literals."""
    constants = _module_constants()
    found: set[str] = set()
    for folder in ("proxy", "protocols", "dashboard"):
        for path in (SOURCE / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            local = constants.get(path.stem, {})
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = (func.attr if isinstance(func, ast.Attribute)
                            else func.id if isinstance(func, ast.Name) else "")
                    pos = _BUILDERS.get(name)
                    if pos is None or len(node.args) <= pos:
                        continue
                    arg = node.args[pos]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.add(arg.value)
                    elif isinstance(arg, ast.Name) and arg.id in local:
                        found.add(local[arg.id])
                    elif (isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name)
                          and arg.attr in constants.get(arg.value.id, {})):
                        found.add(constants[arg.value.id][arg.attr])
                elif isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "kind" for t in node.targets):
                    for sub in ast.walk(node.value):
                        if isinstance(sub, ast.Dict):
                            found.update(v.value for v in sub.values
                                         if isinstance(v, ast.Constant) and isinstance(v.value, str))
                elif isinstance(node, ast.Dict):
                    items = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                             if isinstance(k, ast.Constant)}
                    inner = items.get("error")
                    if isinstance(items.get("type"), ast.Constant) and isinstance(inner, ast.Dict):
                        for k, v in zip(inner.keys, inner.values, strict=True):
                            if (isinstance(k, ast.Constant) and k.value == "type" and isinstance(v, ast.Constant)
                                    and isinstance(v.value, str)):
                                found.add(v.value)
    return found


def test_every_error_type_is_documented() -> None:
    types = _error_types()
    known = {"policy_denied", "proxy_auth_required", "lock_conflict", "approval_pending", "budget_exceeded",
             "audit_unavailable", "request_header_fields_too_large", "upstream_unreachable", "unauthorized",
             "forbidden", "csrf", "not_found", "conflict"}
    assert known <= types, f"the source scan lost some error types (found {sorted(types)}): fix _error_types()"
    text = _text("responses.md")
    missing = sorted(t for t in types if f"`{t}`" not in text)
    assert not missing, ("error.type values the code can answer with but docs/responses.md does not list; add "
                         "each to its 'Refusals by type' table (agent-facing) or 'Admin API errors' table: "
                         + ", ".join(missing))


# -- (d) links -----------------------------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _link_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as `-`."""
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.*)$", _prose(page.read_text(encoding="utf-8")), re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", _link_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_to_docs_resolve(page: Path) -> None:
    broken: list[str] = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # an absolute URL (http:, mailto:)
        if target.startswith("#"):
            if page.parent == DOCS and target[1:] not in _anchors(page):
                broken.append(f"{target} (no such heading on this page)")
            continue
        file = target.split("#", 1)[0]
        resolved = (page.parent / file).resolve()
        if page.parent != DOCS and DOCS not in resolved.parents and resolved != DOCS:
            continue  # README links outside docs/ are not this test's business
        if not resolved.exists():
            broken.append(f"{target} (resolves to {resolved.relative_to(ROOT)})")
        elif "#" in target and resolved.suffix == ".md":
            anchor = target.split("#", 1)[1]
            if anchor not in _anchors(resolved):
                broken.append(f"{target} (no heading with anchor #{anchor} in {resolved.relative_to(ROOT)})")
    assert not broken, (f"{page.relative_to(ROOT)} links to docs files or headings that do not exist; fix the "
                        "link, or add the page or heading: " + ", ".join(broken))


def test_every_docs_page_is_in_the_index() -> None:
    index = _text("README.md")
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert pages, "docs/ has no pages"
    missing = [p for p in pages if f"]({p})" not in index]
    assert not missing, "docs/README.md (the index) does not link these pages; add one line each: " + ", ".join(
        missing)
