"""W3C trace context and OpenTelemetry spans for the exchange and decision paths.

Every request that reaches the token endpoint or an agent surface gets a span:
its trace id comes from an incoming ``traceparent`` header (W3C Trace Context,
level 1) when there is a valid one, else a fresh random one; its span id is new.
Both go on the audit event the request produces, so ``trustmesh audit trace``
ties issuance, decisions and access together.

Spans are exported only when an exporter is configured (``none`` by default):

* ``none``    -- no OpenTelemetry SDK objects at all; ids come from ``os.urandom``,
  drawn 4 KiB at a time (the hot path pays well under a microsecond);
* ``console`` -- spans printed as JSON on stdout (for trying it out);
* ``otlp``    -- OTLP over HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (needs the
  ``opentelemetry-exporter-otlp-proto-http`` package: ``pip install trustmesh[otlp]``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from trustmesh.common.errors import TracingError

EXPORTERS = ("none", "console", "otlp")

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceParent:
    """A parsed ``traceparent`` header."""

    trace_id: str
    span_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The W3C ``traceparent`` header, or ``None`` when it is absent or invalid (the
    spec says to start a new trace then, not to fail the request). Version ``00`` must
    be exactly 55 characters; a later version may append ``-``-separated fields."""
    if not value:
        return None
    value = value.strip()
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


def format_traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


_random_lock = threading.Lock()
_random_pool = b""
_random_at = 0


def _random_hex(size: int) -> str:
    """``size`` random bytes as hex, from ``os.urandom`` 4 KiB at a time (one
    ``getrandom`` call per id costs more than the rest of a span)."""
    global _random_pool, _random_at
    with _random_lock:
        if _random_at + size > len(_random_pool):
            _random_pool, _random_at = os.urandom(4096), 0
        start = _random_at
        _random_at = start + size
        return _random_pool[start : start + size].hex()


def new_trace_id() -> str:
    return _random_hex(16)


def new_span_id() -> str:
    return _random_hex(8)


@dataclass
class Span:
    """The span of one request: its ids (for audit events and outgoing headers) and,
    when exporting, the OpenTelemetry span to annotate."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    sampled: bool = True
    _otel: Any = field(default=None, repr=False)

    def set(self, name: str, value: str | int | bool) -> None:
        if self._otel is not None:
            self._otel.set_attribute(name, value)

    def traceparent(self) -> str:
        """The ``traceparent`` to send downstream: this span as the parent."""
        return format_traceparent(self.trace_id, self.span_id, self.sampled)


class _Ids(AbstractContextManager[Span]):
    """The span of a process that exports none: its ids, nothing to close."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        return self._span

    def __exit__(self, *exc: object) -> None:
        return None


class Tracing:
    """Spans for one process (a control plane or an agent)."""

    def __init__(self, service_name: str, exporter: str = "none") -> None:
        check_exporter(exporter)
        self.exporter = exporter
        self._provider: Any = None
        self._tracer: Any = None
        if exporter != "none":
            self._provider, self._tracer = _sdk_tracer(service_name, exporter)

    def span(
        self, name: str, traceparent: str | None, attributes: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[Span]:
        """A span named ``name``, child of ``traceparent`` when it is valid."""
        parent = parse_traceparent(traceparent)
        if self._tracer is None:
            return _Ids(
                Span(
                    trace_id=parent.trace_id if parent else new_trace_id(),
                    span_id=new_span_id(),
                    parent_span_id=parent.span_id if parent else None,
                    sampled=parent.sampled if parent else True,
                )
            )
        return self._exported(name, parent, attributes)

    @contextmanager
    def _exported(
        self, name: str, parent: TraceParent | None, attributes: Mapping[str, Any] | None
    ) -> Iterator[Span]:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        context = None
        if parent is not None:
            remote = SpanContext(
                trace_id=int(parent.trace_id, 16),
                span_id=int(parent.span_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(parent.flags),
            )
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        with self._tracer.start_as_current_span(
            name, context=context, attributes=dict(attributes or {})
        ) as otel_span:
            ids = otel_span.get_span_context()
            yield Span(
                trace_id=format(ids.trace_id, "032x"),
                span_id=format(ids.span_id, "016x"),
                parent_span_id=parent.span_id if parent else None,
                sampled=bool(ids.trace_flags & 1),
                _otel=otel_span,
            )

    def shutdown(self) -> None:
        """Flush and stop the exporter (on SIGTERM)."""
        if self._provider is not None:
            self._provider.shutdown()


def check_exporter(exporter: str) -> None:
    """TracingError when ``exporter`` cannot work here, without starting it (a process
    that forks workers must not hold an exporter's thread)."""
    if exporter not in EXPORTERS:
        raise TracingError(f"--otel-exporter must be one of {', '.join(EXPORTERS)}")
    if exporter == "otlp":
        try:
            found = importlib.util.find_spec(_OTLP_MODULE) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            raise TracingError(_OTLP_MISSING)


_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_OTLP_MISSING = (
    "--otel-exporter otlp needs opentelemetry-exporter-otlp-proto-http: "
    "pip install 'trustmesh[otlp]'"
)


def _sdk_tracer(service_name: str, exporter: str) -> tuple[Any, Any]:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingError(_OTLP_MISSING) from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider, provider.get_tracer("trustmesh")
