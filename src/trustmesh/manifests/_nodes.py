"""YAML text (or a stored JSON body) -> a small located tree (DESIGN §3).

Manifests are composed with PyYAML's *safe* loader into nodes, never constructed
into arbitrary objects. Every node remembers its 1-based line; a mapping value
carries the line of its key, which is where a reader looks for it. Duplicate keys,
non-string keys, explicit tags other than the core schema's, and anchors/aliases
are refused: aliases make one value appear in several places (and enable
"billion laughs" expansion), and manifests are short enough to write out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from ._errors import Sink

MAX_DEPTH = 64
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_NULL_TAG = "tag:yaml.org,2002:null"
_ALIAS_TAG = "!trustmesh/refused-alias"


@dataclass(frozen=True, eq=False)
class MapNode:
    line: int
    entries: dict[str, Node]


@dataclass(frozen=True, eq=False)
class SeqNode:
    line: int
    items: list[Node]


@dataclass(frozen=True, eq=False)
class ScalarNode:
    """``value`` is what the YAML core schema resolves the scalar to (str, int, float,
    bool, None, a timestamp, bytes); ``raw`` is its source text, for "quote it" hints."""

    line: int
    value: Any
    raw: str


@dataclass(frozen=True, eq=False)
class BadNode:
    """A value that was already reported (e.g. an alias); checkers skip it silently."""

    line: int


Node = MapNode | SeqNode | ScalarNode | BadNode


def join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def describe(value: Any) -> str:
    """A YAML-flavoured name for the type of a resolved scalar or container."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a timestamp" if hasattr(value, "year") else type(value).__name__


def node_type(node: Node) -> str:
    if isinstance(node, MapNode):
        return "a mapping"
    if isinstance(node, SeqNode):
        return "a list"
    if isinstance(node, ScalarNode):
        return describe(node.value)
    return "an invalid value"


class _TooDeep(Exception):
    """The composer went deeper than the converter would ever read (private: caught in
    :func:`compose_documents` as the one "nesting is too deep" refusal)."""


class _Loader(yaml.SafeLoader):
    """Safe loader that refuses anchors and aliases instead of resolving them, and
    stops composing past :data:`MAX_DEPTH` levels itself rather than when Python's
    recursion limit happens to be reached (which depends on the caller's stack and
    limit, so the same text would get different refusals)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.refusals: list[tuple[int, str]] = []
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:  # the root is level 1 here, 0 to the converter
                raise _TooDeep
            return self._compose(parent, index)
        finally:
            self._depth -= 1

    def _compose(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        parser: Any = self  # PyYAML's parser methods are untyped in the stubs
        event = parser.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            parser.get_event()
            self.refusals.append(
                (line, f"alias '*{event.anchor}' is not supported; write the value out")
            )
            marks: Any = (event.start_mark, event.end_mark)
            return yaml.ScalarNode(_ALIAS_TAG, "", *marks)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self.refusals.append(
                (line, f"anchor '&{anchor}' is not supported; write the value out")
            )
        return super().compose_node(parent, index)


def _yaml_error_line(exc: yaml.YAMLError, text: str) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # ReaderError: bad characters
    if isinstance(position, int):
        return text.count("\n", 0, position) + 1
    return 1


def _yaml_error_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.context, exc.problem) if p]
        return "invalid YAML: " + "; ".join(parts) if parts else "invalid YAML"
    return f"invalid YAML: {exc}".splitlines()[0]


def compose_documents(text: str, sink: Sink) -> list[Node]:
    """Every non-empty document of ``text``, as located trees. Problems go to ``sink``;
    after a syntax error the rest of the text is not read."""
    documents: list[Node] = []
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks for bad characters right away
        while loader.check_node():
            root = loader.get_node()
            for line, message in loader.refusals:
                sink.add(line, "", message)
            loader.refusals.clear()
            if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG):
                continue  # an empty document, e.g. after a trailing "---"
            documents.append(_Converter(sink).convert(root, "", root.start_mark.line + 1, 0))
    except yaml.YAMLError as exc:
        sink.add(_yaml_error_line(exc, text), "", _yaml_error_message(exc))
    except (_TooDeep, RecursionError):
        sink.add(1, "", f"invalid YAML: nesting is too deep (more than {MAX_DEPTH} levels)")
    finally:
        if loader is not None:
            loader.dispose()
    return documents


class _Converter:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used

    def convert(self, node: yaml.Node, path: str, line: int, depth: int) -> Node:
        if depth > MAX_DEPTH:
            self.sink.add(line, path, f"nesting is too deep (more than {MAX_DEPTH} levels)")
            return BadNode(line)
        if node.tag == _ALIAS_TAG:
            return BadNode(line)  # already reported by the loader
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                return self._bad_tag(node.tag, path, line)
            return self._mapping(node, path, line, depth)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                return self._bad_tag(node.tag, path, line)
            items = [
                self.convert(item, f"{path}[{i}]", item.start_mark.line + 1, depth + 1)
                for i, item in enumerate(node.value)
            ]
            return SeqNode(line, items)
        try:
            value = self.constructor.construct_object(node, deep=True)
        except Exception:  # the safe constructors raise KeyError, ValueError, ... on bad text
            return self._bad_tag(node.tag, path, line)
        return ScalarNode(line, value, str(node.value))

    def _bad_tag(self, tag: str, path: str, line: int) -> BadNode:
        if tag == "tag:yaml.org,2002:merge":
            self.sink.add(line, path, "merge keys ('<<') are not supported; write the fields out")
        else:
            self.sink.add(line, path, f"unsupported or invalid value with tag {tag!r}")
        return BadNode(line)

    def _mapping(self, node: yaml.MappingNode, path: str, line: int, depth: int) -> MapNode:
        entries: dict[str, Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            key = self.convert(key_node, path, key_line, depth + 1)
            if isinstance(key, BadNode):
                continue
            if not isinstance(key, ScalarNode) or not isinstance(key.value, str):
                hint = f"; quote it ('{key.raw}')" if isinstance(key, ScalarNode) else ""
                self.sink.add(
                    key_line, path, f"field names must be strings, got {node_type(key)}{hint}"
                )
                continue
            field = join(path, key.value)
            if key.value in entries:
                self.sink.add(
                    key_line, field, f"duplicate field (first given on line {key_lines[key.value]})"
                )
                continue
            key_lines[key.value] = key_line
            entries[key.value] = self.convert(value_node, field, key_line, depth + 1)
        return MapNode(line, entries)


def from_value(value: Any, sink: Sink, path: str = "", depth: int = 0) -> Node:
    """A stored JSON-able body -> a located tree with line 0, for re-validation."""
    if depth > MAX_DEPTH:
        sink.add(0, path, f"nesting is too deep (more than {MAX_DEPTH} levels)")
        return BadNode(0)
    if isinstance(value, dict):
        entries: dict[str, Node] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                sink.add(0, path, f"field names must be strings, got {describe(key)}")
                continue
            entries[key] = from_value(item, sink, join(path, key), depth + 1)
        return MapNode(0, entries)
    if isinstance(value, list):
        return SeqNode(
            0, [from_value(item, sink, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        )
    if (
        value is None
        or isinstance(value, str | bool | int)
        or (isinstance(value, float) and math.isfinite(value))
    ):
        return ScalarNode(0, value, json.dumps(value))
    sink.add(0, path, f"{describe(value)} is not a JSON value")
    return BadNode(0)


def to_python(node: Node) -> Any:
    """A located tree -> plain values (for free-form fields checked by another module)."""
    if isinstance(node, MapNode):
        return {key: to_python(child) for key, child in node.entries.items()}
    if isinstance(node, SeqNode):
        return [to_python(child) for child in node.items]
    if isinstance(node, ScalarNode):
        return node.value
    return None
