"""timetracer-otel: record a request and every dependency call beneath its OpenTelemetry spans;
replay it anywhere with the same values, types, errors and order.

    >>> import timetracer_otel
    >>> with timetracer_otel.record(dir="cassettes"):
    ...     run_job()
    >>> with timetracer_otel.replay("cassettes"):
    ...     run_job()          # no network: every dependency answers from the cassette
"""

from timetracer_otel.cassette import Cassette, SpanRecord, load_cassette, save_cassette
from timetracer_otel.config import Mode, OnMiss, Settings
from timetracer_otel.errors import (
    CassetteError,
    ConfigError,
    ReplayMissError,
    ReplayUnsupportedError,
    TimetracerError,
)
from timetracer_otel.index import ReplayIndex, ReplayReport
from timetracer_otel.runtime import Recording, Replaying, record, replay

__all__ = [
    "Cassette",
    "CassetteError",
    "ConfigError",
    "Mode",
    "OnMiss",
    "Recording",
    "ReplayIndex",
    "ReplayMissError",
    "ReplayReport",
    "ReplayUnsupportedError",
    "Replaying",
    "Settings",
    "SpanRecord",
    "TimetracerError",
    "load_cassette",
    "record",
    "replay",
    "save_cassette",
]
