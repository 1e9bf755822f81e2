"""A span processor on the app's provider that keeps finished spans while switched on, for the
tests that send the spans of a real recording to the OTLP receiver."""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

import timetracer_otel


class Tap(SpanProcessor):
    """Keeps finished spans while switched on (the SDK cannot remove a processor)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.spans is not None:
            self.spans.append(span)


_TAP = Tap()


def tap() -> Tap:
    """The one tap, added to the provider the first time."""
    provider = timetracer_otel.runtime.sdk_provider()
    if not getattr(provider, "_test_span_tap", False):
        provider.add_span_processor(_TAP)
        provider._test_span_tap = True  # type: ignore[attr-defined]
    return _TAP
