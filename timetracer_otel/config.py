"""Settings from the environment, with upstream timetracer's variable names kept."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from timetracer_otel.errors import ConfigError

_C = TypeVar("_C", bound="Choice")


class Choice(str, enum.Enum):
    """A setting with named values; a wrong one is a one-line ConfigError listing them."""

    @classmethod
    def parse(cls: type[_C], value: str, what: str) -> _C:
        try:
            if not isinstance(value, str):  # in code, None or a number: the same one line
                raise ValueError(value)
            return cls(value.strip().lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ConfigError(f"{what}={value!r} is not valid; use one of: {valid}.") from None


class Mode(Choice):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


class WriterKind(Choice):
    """Where cassettes are converted and written: a child process (the app's interpreter lock
    stays with the app), a thread of the app's process, or ``auto``: the process where this one
    may use two CPUs or more."""

    AUTO = "auto"
    PROCESS = "process"
    THREAD = "thread"


class WriterPriority(Choice):
    """How the writer process competes for the CPU.

    ``idle``: only for time no other task of the machine wants (Linux's SCHED_IDLE; the
    lowest nice elsewhere), so its conversions and disk flushes keep the app, or a service
    beside it, waiting for a core less. Where the app's process may give it its priority
    back (CAP_SYS_NICE, or an RLIMIT_NICE of 20 or more: root outside a container has it,
    Docker's default capabilities leave it out), it gets it back while a flush or close
    waits for it, while its backlog fills half its pipe, and while it is starved. Where
    not, on a machine that stays saturated it falls behind: flushes wait, and past the
    writer's queue spans are dropped, counted, their cassettes saying ``complete: false``.

    ``normal``: the app's own priority, in a session of its own. ``auto`` (the default):
    ``idle`` where its priority can be given back, else ``normal``: an idle writer that can
    never be given its priority back could fall behind for good on a saturated machine.

    Scenario 1's paired rows measure what idle saves: the app and its upstream wait for a
    core less. A saturating query loop (scenario 4, in steady state) showed no difference
    between the two beyond the runs' spread; an earlier reading that idle cost such loops
    more came from a window that ended before the writer process had booted."""

    AUTO = "auto"
    IDLE = "idle"
    NORMAL = "normal"


class OnMiss(Choice):
    """What a replay does with a call it has no recording for."""

    ERROR = "error"
    PASSTHROUGH = "passthrough"
    RECORD = "record"


def _names(value: str | None) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in (value or "").split(",") if n.strip())


def library_names(value: str | None, source: str) -> frozenset[str]:
    """Comma-separated library names (``TIMETRACER_LIVE_PLUGINS``, ``--live``), each one a
    library timetracer-otel has a shim for: a misspelt name would leave that library replayed
    (or live) with no word said."""
    from timetracer_otel.replay_shims import REGISTRY

    names = _names(value)
    unknown = sorted(names - set(REGISTRY))
    if unknown:
        raise ConfigError(f"{source} names {', '.join(map(repr, unknown))}, which timetracer-otel "
                          f"does not record; use some of: {', '.join(sorted(REGISTRY))}.")
    return names


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A yes/no setting; anything else is an error, not a silent no."""
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name}={env.get(name)!r} is not valid; use 1/true/yes or 0/false/no.")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number.")
    return value


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive whole number of bytes (``1e6`` allowed, as it always was)."""
    value = _float(env, name, default)
    if value < 1 or value != int(value):
        raise ConfigError(f"{name}={env.get(name)!r} must be a positive whole number of bytes.")
    return int(value)


Format = Literal["msgpack", "json"]  # the cassette encodings


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the environment can set. ``Settings.from_env()`` reads ``os.environ``."""

    mode: Mode = Mode.OFF
    dir: str = "./cassettes"
    cassette: str | None = None
    format: Format = "msgpack"
    on_miss: OnMiss = OnMiss.ERROR
    live: frozenset[str] = field(default_factory=frozenset)
    mock: frozenset[str] = field(default_factory=frozenset)
    sample_rate: float = 1.0
    errors_only: bool = False
    strict: bool = False
    max_payload_bytes: int = 16 * 1024 * 1024
    report: str | None = None
    writer: WriterKind = WriterKind.AUTO
    writer_priority: WriterPriority = WriterPriority.AUTO
    # Payloads on the spans even while a timetracer writer in this process takes them (for a
    # Collector running `timetracer-otel collect` beside a local recording).
    span_payloads: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        if env is None:
            from timetracer_otel.redaction import default_redactor

            default_redactor()  # the redaction rules of the environment: a bad one stops here
            env = os.environ
        fmt = env.get("TIMETRACER_FORMAT", "msgpack").strip().lower() or "msgpack"
        if fmt not in ("msgpack", "json"):
            raise ConfigError(f"TIMETRACER_FORMAT={fmt!r} is not valid; use one of: msgpack, json.")
        from timetracer_otel.crypto import env_key

        env_key(env)  # a malformed TIMETRACER_ENCRYPTION_KEY stops here, before the program runs
        rate = _float(env, "TIMETRACER_SAMPLE_RATE", 1.0)
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"TIMETRACER_SAMPLE_RATE={rate} must be between 0 and 1.")
        return cls(
            mode=Mode.parse(env.get("TIMETRACER_MODE", "off") or "off", "TIMETRACER_MODE"),
            dir=env.get("TIMETRACER_DIR") or "./cassettes",
            cassette=env.get("TIMETRACER_CASSETTE") or None,
            format="json" if fmt == "json" else "msgpack",
            on_miss=OnMiss.parse(env.get("TIMETRACER_ON_MISS", "error") or "error", "TIMETRACER_ON_MISS"),
            live=library_names(env.get("TIMETRACER_LIVE_PLUGINS"), "TIMETRACER_LIVE_PLUGINS"),
            mock=library_names(env.get("TIMETRACER_MOCK_PLUGINS"), "TIMETRACER_MOCK_PLUGINS"),
            sample_rate=rate,
            errors_only=_flag(env, "TIMETRACER_ERRORS_ONLY"),
            strict=_flag(env, "TIMETRACER_STRICT"),
            max_payload_bytes=_size(env, "TIMETRACER_MAX_PAYLOAD_BYTES", 16 * 1024 * 1024),
            report=env.get("TIMETRACER_REPORT") or None,
            writer=WriterKind.parse(env.get("TIMETRACER_WRITER", "auto") or "auto",
                                    "TIMETRACER_WRITER"),
            writer_priority=WriterPriority.parse(
                env.get("TIMETRACER_WRITER_PRIORITY", "auto") or "auto",
                "TIMETRACER_WRITER_PRIORITY"),
            span_payloads=_flag(env, "TIMETRACER_SPAN_PAYLOADS"),
        )
