"""Span → cassette: the SpanProcessor, the SpanExporter, the writer and its storage."""

from timetracer_otel.exporters.exporter import CassetteSpanExporter
from timetracer_otel.exporters.processor import CassetteSpanProcessor
from timetracer_otel.exporters.writer import CassetteWriter

__all__ = ["CassetteSpanExporter", "CassetteSpanProcessor", "CassetteWriter"]
