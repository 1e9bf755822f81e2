"""CassetteSpanExporter: ``OTEL_TRACES_EXPORTER=timetracer`` for ``opentelemetry-instrument``.

The SDK wraps it in a BatchSpanProcessor; ``export`` hands the batch to the cassette writer
and returns at once. Settings come from ``TIMETRACER_*`` variables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from timetracer_otel.config import Settings
from timetracer_otel.exporters.writer import CassetteWriter, finish_on_sigterm
from timetracer_otel.replay_shims.base import STATE

log = logging.getLogger("timetracer_otel")


class CassetteSpanExporter(SpanExporter):
    def __init__(self, dir: str | None = None, *, settings: Settings | None = None) -> None:
        s = settings or Settings.from_env()
        self.writer = CassetteWriter(
            dir or s.dir,
            fmt=s.format,
            via="exporter",
            sample_rate=s.sample_rate,
            errors_only=s.errors_only,
        )
        # This writer takes the spans: shims may leave calls to it.
        STATE.put(defer=not s.span_payloads, max_payload_bytes=s.max_payload_bytes)
        finish_on_sigterm()  # (made by OTel's configurator as the program starts)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            for span in spans:
                self.writer.submit(span)
        except Exception:  # never into the app, never into the SDK's batch thread
            log.warning("timetracer-otel: export failed", exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        STATE.put(defer=False)
        self.writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000)
