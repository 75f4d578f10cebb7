"""The declarative schema mechanism for manifests (DESIGN §3).

A kind's ``spec`` is described by a table of :class:`Field` entries built from a few
checker factories (:func:`obj`, :func:`string`, :func:`integer`, :func:`map_of`,
:func:`list_of`). A checker takes a located node, its dotted field path and a
:class:`Sink`; it reports every problem it finds to the sink and returns either the
canonical JSON-able value (defaults filled in, the manifest's field names kept) or
:data:`INVALID`. Checkers never raise, so one pass reports everything.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from ._errors import Sink
from ._nodes import BadNode, MapNode, Node, ScalarNode, SeqNode, join, node_type


class _Invalid:
    _instance: _Invalid | None = None

    def __new__(cls) -> _Invalid:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()
"""Returned by a checker whose value had problems (already reported)."""

Checker = Callable[[Node, str, Sink], Any]
"""(node, dotted field path, sink) -> canonical value, or INVALID after reporting."""

Validate = Callable[[str], object]
"""Extra rule for a string value: raise ValueError with a message to refuse it."""

Rule = Callable[[MapNode, dict[str, Any], str, Sink], bool]
"""Cross-field rule of an object: (node, checked fields, path, sink) -> still valid?"""


def check(checker: Checker, node: Node, path: str, sink: Sink) -> Any:
    """Run ``checker`` unless the node was already refused while reading the YAML."""
    if isinstance(node, BadNode):
        return INVALID
    return checker(node, path, sink)


def type_problem(node: Node, path: str, sink: Sink, expected: str) -> _Invalid:
    hint = ""
    if expected == "a string" and isinstance(node, ScalarNode) and node.value is not None:
        hint = f'; quote it ("{node.raw}") if you mean text'
    sink.add(node.line, path, f"expected {expected}, got {node_type(node)}{hint}")
    return INVALID


def suggestion(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for a close match, else ``""``."""
    options = list(choices)
    same_letters = [c for c in options if c.lower() == word.lower()]
    close = same_letters or difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class Field:
    """One field of an object. ``refused`` makes a recognised field an error with that
    message (a feature we deliberately do not offer); ``suggest`` controls whether its
    name is offered as a "did you mean" for a misspelling."""

    name: str
    check: Checker | None = None
    required: bool = False
    default: Callable[[], Any] | None = None
    refused: str | None = None
    suggest: bool = True


def refused(name: str, message: str, *, suggest: bool = True) -> Field:
    return Field(name, refused=message, suggest=suggest)


def obj(*fields: Field, rules: tuple[Rule, ...] = ()) -> Checker:
    """A mapping with exactly these fields: unknown ones are problems (with a "did you
    mean"), missing required ones are problems, absent defaults are filled in."""
    table = {f.name: f for f in fields}
    offered = [f.name for f in fields if f.suggest]

    def check_object(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, MapNode):
            return type_problem(node, path, sink, "a mapping")
        ok = True
        checked: dict[str, Any] = {}
        misspelt: set[str] = set()  # known names suggested for unknown keys
        for key, child in node.entries.items():
            field_path = join(path, key)
            spec = table.get(key)
            if spec is None:
                hint = suggestion(key, offered)
                if hint:
                    misspelt.add(hint.split("'")[1])
                else:
                    hint = f"; known fields: {', '.join(offered)}"
                sink.add(child.line, field_path, f"unknown field {key!r}{hint}")
                ok = False
            elif spec.refused is not None or spec.check is None:
                sink.add(child.line, field_path, spec.refused or "field is not supported")
                ok = False
            else:
                value = check(spec.check, child, field_path, sink)
                if value is INVALID:
                    ok = False
                else:
                    checked[key] = value
        result: dict[str, Any] = {}
        for spec in fields:
            if spec.name in checked:
                result[spec.name] = checked[spec.name]
            elif spec.name in node.entries or spec.refused is not None:
                continue
            elif spec.required:
                if spec.name not in misspelt:  # else the misspelling is the one problem
                    sink.add(node.line, join(path, spec.name), "required field is missing")
                ok = False
            elif spec.default is not None:
                result[spec.name] = spec.default()
        for rule in rules:
            ok = rule(node, result, path, sink) and ok
        return result if ok else INVALID

    return check_object


def exclusive(*names: str, hint: str = "") -> Rule:
    """At most one of ``names`` may be given; the later ones are reported."""

    def rule(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
        present = [n for n in node.entries if n in names]
        for extra in present[1:]:
            sink.add(
                node.entries[extra].line,
                join(path, extra),
                f"{present[0]!r} and {extra!r} are mutually exclusive{hint}",
            )
        return len(present) <= 1

    return rule


def string(
    *validators: Validate, max_length: int | None = None, allow_empty: bool = False
) -> Checker:
    """A string, non-empty unless ``allow_empty`` (never a YAML number, boolean, null or
    timestamp: those are reported with a hint to quote them)."""

    def check_string(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, ScalarNode) or not isinstance(node.value, str):
            return type_problem(node, path, sink, "a string")
        value: str = node.value
        if not value and not allow_empty:
            sink.add(node.line, path, "must not be empty")
            return INVALID
        if max_length is not None and len(value) > max_length:
            sink.add(node.line, path, f"must be at most {max_length} characters")
            return INVALID
        for validate in validators:
            try:
                validate(value)
            except ValueError as exc:
                sink.add(node.line, path, str(exc))
                return INVALID
        return value

    return check_string


def choice(*allowed: str) -> Validate:
    def validate(value: str) -> None:
        if value not in allowed:
            raise ValueError(
                f"{value!r} is not one of {', '.join(allowed)}{suggestion(value, allowed)}"
            )

    return validate


def integer(minimum: int | None = None, maximum: int | None = None) -> Checker:
    """An integer (YAML ``true`` is a boolean, not 1)."""

    def check_integer(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, ScalarNode) or not is_int(node.value):
            return type_problem(node, path, sink, "an integer")
        return in_range(int(node.value), minimum, maximum, node, path, sink)

    return check_integer


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def in_range(
    value: int,
    minimum: int | None,
    maximum: int | None,
    node: Node,
    path: str,
    sink: Sink,
    unit: str = "",
) -> Any:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        sink.add(node.line, path, f"must be between {minimum} and {maximum}{unit}, got {value}")
        return INVALID
    return value


def list_of(
    item: Checker, *, min_items: int = 0, max_items: int | None = None, distinct: bool = False
) -> Checker:
    """A list of checked items; ``distinct``: no item may be listed twice."""

    def check_list(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, SeqNode):
            return type_problem(node, path, sink, "a list")
        if len(node.items) < min_items:
            sink.add(node.line, path, f"must list at least {min_items} item(s)")
            return INVALID
        if max_items is not None and len(node.items) > max_items:
            sink.add(node.line, path, f"must list at most {max_items} item(s)")
            return INVALID
        values = [check(item, child, f"{path}[{i}]", sink) for i, child in enumerate(node.items)]
        if any(v is INVALID for v in values):
            return INVALID
        if distinct:
            for i, value in enumerate(values):
                if value in values[:i]:
                    sink.add(node.items[i].line, f"{path}[{i}]", f"{value!r} is listed twice")
                    return INVALID
        return values

    return check_list


def map_of(value: Checker, *key_validators: Validate) -> Checker:
    """A mapping of free keys (each passed to ``key_validators``) to checked values;
    the canonical form has its keys sorted."""

    def check_map(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, MapNode):
            return type_problem(node, path, sink, "a mapping")
        ok = True
        result: dict[str, Any] = {}
        for key, child in node.entries.items():
            field_path = join(path, key)
            try:
                if not key:
                    raise ValueError("keys must not be empty")
                for validate in key_validators:
                    validate(key)
            except ValueError as exc:
                sink.add(child.line, field_path, str(exc))
                ok = False
                continue
            checked = check(value, child, field_path, sink)
            if checked is INVALID:
                ok = False
            else:
                result[key] = checked
        return dict(sorted(result.items())) if ok else INVALID

    return check_map


def string_map(*key_validators: Validate) -> Checker:
    """Labels, annotations: string keys to string values."""
    return map_of(string(allow_empty=True), *key_validators)


_DURATION = re.compile(r"^(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$")
_DURATION_HINT = "an integer number of seconds or a duration such as '300s', '5m', '1h30m' or '30d'"


def duration(minimum: int, maximum: int) -> Checker:
    """Seconds as an integer, or a string of h/m/s parts; canonical form is int seconds."""

    def check_duration(node: Node, path: str, sink: Sink) -> Any:
        if not isinstance(node, ScalarNode) or not (
            is_int(node.value) or isinstance(node.value, str)
        ):
            return type_problem(node, path, sink, _DURATION_HINT)
        if isinstance(node.value, str):
            match = _DURATION.match(node.value)
            if not node.value or match is None:
                sink.add(node.line, path, f"{node.value!r} is not {_DURATION_HINT}")
                return INVALID
            days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            total = days * 86400 + hours * 3600 + minutes * 60 + seconds
        else:
            total = int(node.value)
        return in_range(total, minimum, maximum, node, path, sink, " seconds")

    return check_duration
