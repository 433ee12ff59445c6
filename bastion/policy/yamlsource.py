"""Read YAML while remembering the line of every node, so each error can say `FILE:LINE: message`.

PyYAML's safe loader throws line numbers away once it builds Python objects. We convert the document
ourselves and record `path -> line` for every mapping key and sequence item. Duplicate keys, which PyYAML
silently accepts (the last one wins), are reported: in a policy file they are almost always a mistake that
would silently drop a rule or a condition.

Two readers produce the same data:

- The plain reader builds Python data straight from libyaml's events and records the lines of the first two
  levels only (`SHALLOW_DEPTH`: a file's sections and their entries, such as `("rules", 7)`: what a loaded
  policy names as each rule's source). It handles what policy files are made of (block and flow mappings,
  sequences, plain and quoted scalars) and hands anything else (anchors, aliases, merge keys, explicit tags,
  duplicate or non-scalar keys, multiple documents, syntax errors, values it cannot construct) to the node
  reader. On 10,000 generated rules (1.7 MB, 207,000 nodes) it takes 0.28 s where composing PyYAML's node
  tree and converting it takes 1.07 s, 0.47 s of which is garbage collection: the node tree, two marks per
  node and a path tuple per node stay alive until the end, so every collection walks them. (libyaml itself
  parses the file in 0.03 s; building one Python event per node takes 0.18 s.)
- The node reader composes PyYAML's node tree and converts it, recording every line and reporting every
  problem. It runs when the plain reader declines the document. libyaml composes the whole tree in one call
  that cannot pace itself (`pacing.py`): while it runs on a reload's worker thread, the proxy's event loop
  wakes up 5 ms late at the median and up to 40 ms late (10,000 rules), against 0.2 ms and 12 ms with the
  paced plain reader.

Deeper lines are read on first need: the first time `line_of` is asked about a path deeper than
`SHALLOW_DEPTH`, the plain reader reads the text again, recording every level. An error message inside a rule
costs that one more read; a valid policy never needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import MappingEndEvent, MappingStartEvent, ScalarEvent, SequenceEndEvent, SequenceStartEvent

from bastion.policy.pacing import Pacer

Path = tuple[str | int, ...]

# libyaml's parser when PyYAML was built with it (10x faster on large policies); same nodes and marks.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SHALLOW_DEPTH = 2  # the plain reader records the lines of paths up to this long: ("rules", 7), ("agents", "bot")
_STR_TAG = "tag:yaml.org,2002:str"


@dataclass
class SourceIssue:
    line: int | None
    message: str
    code: str = "yaml_syntax"  # docs/policy-errors.md: every problem found here but duplicate keys is unreadable YAML


@dataclass
class YamlDocument:
    """The parsed data of one file and the line of each node path (1-based).

    `lines` holds every node path once complete; after the plain reader it holds the paths up to
    `SHALLOW_DEPTH` long and `line_of` completes it (from `text`) the first time it needs a deeper one."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    issues: list[SourceIssue] = field(default_factory=list)
    text: str | None = field(default=None, repr=False)  # set while `lines` holds the shallow paths only

    def line_of(self, path: Path) -> int | None:
        """The line of the deepest known node on `path` (errors deep inside a scalar point at its key)."""
        p = tuple(path)
        if self.text is not None and len(p) > SHALLOW_DEPTH:
            self.complete()
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def complete(self) -> None:
        """Record the line of every node: the plain reader reads the same text again, tracking every level."""
        if self.text is not None:
            doc = _read_plain(self.text, None, Pacer().pace) or _read_nodes(self.text)
            self.lines = doc.lines
            self.text = None


def parse_yaml(text: str, pace: Callable[[], None] | None = None) -> YamlDocument:
    """Parse one YAML document. Syntax errors become issues with the line PyYAML reports. `pace` is called
    between the entries of the first two levels (see `pacing.py`)."""
    doc = _read_plain(text, SHALLOW_DEPTH, pace)
    return doc if doc is not None else _read_nodes(text)


# ---------------------------------------------------------------------------------------------------------
# The plain reader


class _Declined(Exception):
    """The document holds something the plain reader leaves to the node reader."""


def _read_plain(text: str, depth: int | None, pace: Callable[[], None] | None = None) -> YamlDocument | None:
    """The document's data and the lines of the paths up to `depth` long (None: all), or None when the node
    reader must read it (see the module doc)."""
    loader = _Loader(text)
    try:
        return _PlainReader(loader, depth, pace).document(text)
    except Exception:  # whatever it was, the node reader meets it again and reports or raises it
        return None
    finally:
        loader.dispose()


class _PlainReader:
    """Events -> Python data, converting each scalar as the node reader's `construct_object` does.

    Scalars are resolved and constructed once per distinct (value, implicit) pair: a policy repeats the
    same keys and values (`id`, `effect`, `allow`, `GET`, hosts) thousands of times. The results are
    immutable (str, int, float, bool, None, dates), so sharing them is invisible."""

    def __init__(self, loader: yaml.SafeLoader, depth: int | None, pace: Callable[[], None] | None) -> None:
        if loader.yaml_path_resolvers:  # tags would depend on the path; the node reader handles that
            raise _Declined
        self.loader = loader
        self.get = loader.get_event
        self.depth = depth
        self.pace = pace
        self.scalars: dict[tuple[str, tuple[bool, bool]], Any] = {}
        self.lines: dict[Path, int] = {}

    def document(self, text: str) -> YamlDocument:
        get = self.get
        get()  # StreamStartEvent
        start = get()
        if start.__class__ is not yaml.DocumentStartEvent:
            raise _Declined  # an empty stream
        root = get()
        self.lines[()] = root.start_mark.line + 1
        data = self.node(root, ())
        scalars = self.scalars  # 100,000 entries for 50,000 rules: freed in one go, 15 ms of GIL on a reload
        while scalars:
            scalars.popitem()
            if self.pace is not None:
                self.pace()
        get()  # DocumentEndEvent
        if get().__class__ is not yaml.StreamEndEvent:
            raise _Declined  # a second document: the node reader reports it
        return YamlDocument(data, self.lines, text=None if self.depth is None else text)

    def scalar(self, ev: Any) -> Any:
        if ev.anchor is not None or (ev.tag is not None and ev.tag != "!"):
            raise _Declined
        key = (ev.value, ev.implicit)
        try:
            return self.scalars[key]
        except KeyError:
            pass
        tag = self.loader.resolve(yaml.ScalarNode, ev.value, ev.implicit)
        if tag == _STR_TAG:
            value = ev.value
        else:  # merge keys and `=` raise here (no constructor): the node reader handles them
            value = self.loader.construct_object(yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark,
                                                                 ev.style), deep=True)
        self.scalars[key] = value
        return value

    def node(self, ev: Any, path: Path | None) -> Any:
        """Convert the node that starts with `ev`; record the lines of its children while `path` (the
        node's own path) is shorter than the reader's depth, else pass None down and record nothing."""
        cls = ev.__class__
        if cls is ScalarEvent:
            return self.scalar(ev)
        if ev.anchor is not None or (ev.tag is not None and ev.tag != "!"):
            raise _Declined
        get, scalar, node, lines = self.get, self.scalar, self.node, self.lines
        track = path is not None and (self.depth is None or len(path) < self.depth)
        pace = self.pace if path is not None and len(path) < SHALLOW_DEPTH else None
        child: Path | None = None
        if cls is MappingStartEvent:
            out: dict[str, Any] = {}
            while (k := get()).__class__ is ScalarEvent:
                key = scalar(k)
                if key.__class__ is not str:
                    key = str(key)
                if key in out:
                    raise _Declined  # a duplicate key
                if pace is not None:
                    pace()
                if track and path is not None:
                    child = (*path, key)
                    lines[child] = k.start_mark.line + 1
                v = get()
                out[key] = scalar(v) if v.__class__ is ScalarEvent else node(v, child)
            if k.__class__ is MappingEndEvent:
                return out
            raise _Declined  # a collection as a key
        if cls is SequenceStartEvent:
            items: list[Any] = []
            while (item := get()).__class__ is not SequenceEndEvent:
                if pace is not None:
                    pace()
                if track and path is not None:
                    child = (*path, len(items))
                    lines[child] = item.start_mark.line + 1
                items.append(scalar(item) if item.__class__ is ScalarEvent else node(item, child))
            return items
        raise _Declined  # an alias


# ---------------------------------------------------------------------------------------------------------
# The node reader


def _read_nodes(text: str) -> YamlDocument:
    """Compose the node tree and convert it, recording every line and every problem."""
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
                                              f"duplicate key {key_s!r} (first at line {doc.lines[child]})",
                                              "duplicate_key"))
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
