"""CassetteSpanProcessor: an SDK SpanProcessor that writes cassettes in the background.

    >>> provider.add_span_processor(CassetteSpanProcessor(dir="cassettes"))

``on_end`` only enqueues a snapshot of the finished span; everything else runs on the writer
thread.
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from timetracer_otel.cassette import Format
from timetracer_otel.config import Settings
from timetracer_otel.exporters.storage import Storage
from timetracer_otel.exporters.writer import CassetteWriter
from timetracer_otel.replay_shims.base import STATE


class CassetteSpanProcessor(SpanProcessor):
    def __init__(
        self,
        dir: str | Storage | None = None,
        *,
        format: Format | None = None,
        writer: CassetteWriter | None = None,
        settings: Settings | None = None,
    ) -> None:
        s = settings or Settings.from_env()
        self.writer = writer or CassetteWriter(
            dir if dir is not None else s.dir,
            fmt=format or s.format,
            via="processor",
            sample_rate=s.sample_rate,
            errors_only=s.errors_only,
        )
        self.enabled = True
        # This writer takes the spans: shims may leave calls to it.
        STATE.put(defer=not s.span_payloads, max_payload_bytes=s.max_payload_bytes)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.enabled:
            self.writer.submit(span)

    def shutdown(self) -> None:
        STATE.put(defer=False)
        self.writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000)
