"""Read YAML while remembering the line of every node, so each error can say `FILE:LINE: message`.

PyYAML's safe loader throws line numbers away once it builds Python objects. We compose the node tree,
convert it ourselves, and record `path -> line` for every mapping key and sequence item. Duplicate keys, which
PyYAML silently accepts (the last one wins), are reported: in a policy file they are almost always a mistake
that would silently drop a rule or a condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

# libyaml's parser when PyYAML was built with it (10x faster on large policies); same nodes and marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class SourceIssue:
    line: int | None
    message: str


@dataclass
class YamlDocument:
    """The parsed data of one file and the line of each node path (1-based)."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    issues: list[SourceIssue] = field(default_factory=list)

    def line_of(self, path: Path) -> int | None:
        """The line of the deepest known node on `path` (errors deep inside a scalar point at its key)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)


def parse_yaml(text: str) -> YamlDocument:
    """Parse one YAML document. Syntax errors become issues with the line PyYAML reports."""
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = e.problem or str(e)
            if e.context:
                problem = f"{e.context}, {problem}"
            return YamlDocument(None, issues=[SourceIssue(line, f"YAML syntax error: {problem}")])
        except yaml.YAMLError as e:
            return YamlDocument(None, issues=[SourceIssue(None, f"YAML error: {e}")])
        doc = YamlDocument(None)
        if node is None:
            return doc
        doc.lines[()] = node.start_mark.line + 1
        doc.data = _convert(loader, node, (), doc)
        return doc
    finally:
        loader.dispose()


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path, doc: YamlDocument) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        loader.flatten_mapping(node)  # resolves `<<:` merge keys
        for key_node, value_node in node.value:
            key = _convert(loader, key_node, path, doc)
            if isinstance(key, (dict, list)):
                doc.issues.append(SourceIssue(key_node.start_mark.line + 1, "a mapping key must be a scalar"))
                continue
            key_s = key if isinstance(key, str) else str(key)
            child = (*path, key_s)
            if key_s in out:
                doc.issues.append(SourceIssue(key_node.start_mark.line + 1,
                                              f"duplicate key {key_s!r} (first at line {doc.lines[child]})"))
                continue
            doc.lines[child] = key_node.start_mark.line + 1
            out[key_s] = _convert(loader, value_node, child, doc)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            doc.lines[(*path, i)] = item.start_mark.line + 1
            items.append(_convert(loader, item, (*path, i), doc))
        return items
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as e:
        doc.issues.append(SourceIssue(node.start_mark.line + 1, f"cannot read value: {e.problem}"))
        return None
