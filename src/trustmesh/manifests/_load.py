"""Loading manifests from text, files and directories, and from stored bodies (DESIGN §3).

Everything is checked before anything is returned: problems from every document of
every file are collected (plus documents defined twice across the whole input) and
raised together as one :class:`ManifestError`, so an apply is all-or-nothing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from ._errors import ManifestError, Problem, Sink
from ._kinds import API_VERSION, KINDS, METADATA, KindSpec, Spec
from ._nodes import MapNode, Node, ScalarNode, compose_documents, from_value, node_type
from ._schema import INVALID, Checker, Field, obj, string, suggestion

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STORED_PATH = "<stored>"


@dataclass(frozen=True)
class Document:
    """One valid manifest. ``body`` is its canonical JSON-able form (manifest field
    names, defaults filled in), which is what gets stored and hashed."""

    kind: str
    name: str
    spec: Spec
    path: str
    line: int
    body: dict[str, Any]


def _api_version(value: str) -> None:
    if value != API_VERSION:
        raise ValueError(f"apiVersion must be {API_VERSION!r}, got {value!r}")


def _kind(value: str) -> None:
    if value not in KINDS:
        known = ", ".join(KINDS)
        raise ValueError(f"unknown kind {value!r}{suggestion(value, KINDS)}; known kinds: {known}")


def _skip(node: Node, path: str, sink: Sink) -> Any:
    return INVALID  # spec of an unknown kind: the kind is what gets reported


@functools.cache
def _top_level(kind: str | None) -> Checker:
    spec = KINDS[kind].spec if kind in KINDS else _skip
    return obj(
        Field("apiVersion", string(_api_version), required=True),
        Field("kind", string(_kind), required=True),
        Field("metadata", METADATA, required=True),
        Field("spec", spec, required=True),
    )


def _scalar_str(node: Node | None) -> str | None:
    if isinstance(node, ScalarNode) and isinstance(node.value, str):
        return node.value
    return None


def _identity(root: MapNode) -> tuple[str, str, int] | None:
    """(kind, name, line of the name) even if the rest of the document is invalid."""
    kind = _scalar_str(root.entries.get("kind"))
    metadata = root.entries.get("metadata")
    if kind is None or not isinstance(metadata, MapNode):
        return None
    name_node = metadata.entries.get("name")
    name = _scalar_str(name_node)
    return None if name is None or name_node is None else (kind, name, name_node.line)


class _Loader:
    """Validates documents from any number of sources and remembers identities."""

    def __init__(self) -> None:
        self.documents: list[Document] = []
        self.problems: list[Problem] = []
        self.seen: dict[tuple[str, str], str] = {}

    def add_source(self, sink: Sink, roots: list[Node]) -> None:
        for root in roots:
            document = self._document(root, sink)
            if document is not None:
                self.documents.append(document)
        self.problems.extend(sorted(sink.problems, key=lambda p: p.line))

    def _document(self, root: Node, sink: Sink) -> Document | None:
        if not isinstance(root, MapNode):
            sink.add(root.line, "", f"a manifest must be a mapping, got {node_type(root)}")
            return None
        identity = _identity(root)
        if identity is not None:
            kind, name, line = identity
            first = self.seen.get((kind, name))
            if first is not None:
                sink.add(
                    line, "metadata.name", f"{kind} {name!r} is defined twice (first at {first})"
                )
            else:
                self.seen[(kind, name)] = f"{sink.path}:{line}"
        kind_spec: KindSpec | None = KINDS.get(_scalar_str(root.entries.get("kind")) or "")
        body = _top_level(kind_spec.kind if kind_spec else None)(root, "", sink)
        if body is INVALID or kind_spec is None or identity is None:
            return None
        name = body["metadata"]["name"]
        kind_spec.finalize(body["spec"], name)
        return Document(
            kind=kind_spec.kind,
            name=name,
            spec=kind_spec.build(body["spec"]),
            path=sink.path,
            line=root.line,
            body=body,
        )

    def result(self) -> list[Document]:
        if self.problems:
            raise ManifestError(self.problems)
        return self.documents


def parse_text(text: str, path: str = "<stdin>") -> list[Document]:
    """Every manifest in a YAML (or JSON) text; raises ManifestError with all problems."""
    loader = _Loader()
    sink = Sink(path)
    loader.add_source(sink, compose_documents(text, sink))
    return loader.result()


def _expand(path: str, sink_of: list[Sink]) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        sink_of.append(Sink(path, [Problem(path, 0, "", f"cannot read: {exc.strerror or exc}")]))
        return []
    files = [
        os.path.join(path, n)
        for n in names
        if n.endswith(MANIFEST_SUFFIXES) and os.path.isfile(os.path.join(path, n))
    ]
    if not files:
        message = f"directory has no {', '.join('*' + s for s in MANIFEST_SUFFIXES)} files"
        sink_of.append(Sink(path, [Problem(path, 0, "", message)]))
    return files


def _read(path: str, sink: Sink) -> str | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        sink.add(0, "", f"cannot read: {exc.strerror or exc}")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        sink.add(data.count(b"\n", 0, exc.start) + 1, "", "file is not valid UTF-8")
        return None


def load_paths(paths: list[str]) -> list[Document]:
    """Manifests from files and directories (a directory's ``*.yaml``, ``*.yml`` and
    ``*.json`` files, sorted, not recursive). Raises ManifestError with every problem,
    including unreadable paths."""
    loader = _Loader()
    for path in paths:
        failed: list[Sink] = []
        for file in _expand(path, failed):
            sink = Sink(file)
            text = _read(file, sink)
            loader.add_source(sink, compose_documents(text, sink) if text is not None else [])
        for sink in failed:
            loader.add_source(sink, [])
    return loader.result()


def document_from_body(body: dict[str, Any]) -> Document:
    """Rebuild a Document from its stored canonical body (path ``<stored>``, line 0),
    validating it exactly as a manifest; raises ManifestError if it is not valid."""
    loader = _Loader()
    sink = Sink(STORED_PATH)
    if not isinstance(body, dict):
        sink.add(0, "", f"a stored manifest must be a mapping, got {type(body).__name__}")
        roots: list[Node] = []
    else:
        roots = [from_value(body, sink)]
    loader.add_source(sink, roots)
    documents = loader.result()
    if len(documents) != 1:  # pragma: no cover - a valid body is exactly one document
        raise ManifestError([Problem(STORED_PATH, 0, "", "not a manifest")])
    return documents[0]
