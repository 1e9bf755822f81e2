"""The ``opentelemetry_pre_instrument`` hook: zero-code record and replay.

``opentelemetry-instrument`` calls :func:`pre_instrument` before any instrumentor, so the
shims are patched first and the instrumentors wrap them. ``TIMETRACER_MODE`` decides:

- ``record``: shims put payloads on the spans; any exporter carries them
  (``OTEL_TRACES_EXPORTER=timetracer`` writes cassettes, ``otlp`` sends them to a Collector).
- ``replay``: the cassette at ``TIMETRACER_CASSETTE`` (or ``TIMETRACER_DIR``) answers every
  call; a setup error stops the process with exit code 2 rather than letting it go live.
"""

from __future__ import annotations

import atexit
import os
import sys

import msgspec

from timetracer_otel import replay_shims
from timetracer_otel.config import Mode, Settings
from timetracer_otel.errors import TimetracerError
from timetracer_otel.index import ReplayIndex
from timetracer_otel.replay_shims.base import STATE


def _fail(message: str) -> None:
    sys.stderr.write(f"timetracer-otel: {message}\n")
    sys.stderr.flush()
    os._exit(2)  # replay must never fall through to live dependencies


def pre_instrument() -> None:
    try:
        settings = Settings.from_env()
    except TimetracerError as exc:
        _fail(str(exc))
        return
    if settings.mode is Mode.OFF:
        return
    if settings.mode is Mode.RECORD:
        replay_shims.install()
        STATE.mode = Mode.RECORD
        return
    source = settings.cassette or settings.dir
    try:
        index = ReplayIndex.from_paths([source], strict=settings.strict)
    except TimetracerError as exc:
        _fail(str(exc))
        return
    replay_shims.install()
    STATE.index = index
    STATE.on_miss = settings.on_miss
    STATE.live = settings.live
    STATE.mock = settings.mock
    STATE.mode = Mode.REPLAY
    atexit.register(_write_report, index, settings.report)


def _write_report(index: ReplayIndex, path: str | None) -> None:
    report = index.report()
    if path:
        with open(path, "wb") as fh:
            fh.write(msgspec.json.encode(report))
    elif report.shape_matches or report.misses:
        sys.stderr.write(report.render() + "\n")
