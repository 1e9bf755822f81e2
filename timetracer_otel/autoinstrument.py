"""Zero-code record and replay under ``opentelemetry-instrument``.

    $ OTEL_TRACES_EXPORTER=timetracer TIMETRACER_MODE=record opentelemetry-instrument python app.py
    $ TIMETRACER_MODE=replay TIMETRACER_CASSETTE=cassettes opentelemetry-instrument python app.py

Two hooks:

- :func:`launcher_defaults` runs in the ``opentelemetry-instrument`` launcher, before the
  program starts (entry point group ``opentelemetry_environment_variables``). It fills in the
  OTel variables the user left unset, because ``opentelemetry-distro`` otherwise defaults every
  signal to OTLP over gRPC, and without the gRPC exporter installed the SDK configurator raises
  and *all* instrumentation, our shims included, is skipped: a replay would silently go live.
- :func:`pre_instrument` is the ``opentelemetry_pre_instrument`` hook: it installs the shims
  before any instrumentor. ``TIMETRACER_MODE=record`` makes them put payloads on the spans (any
  exporter carries them: ``timetracer`` writes cassettes, ``otlp`` sends them to a Collector);
  ``replay`` answers every call from ``TIMETRACER_CASSETTE`` (or ``TIMETRACER_DIR``) and stops
  the process with exit code 2 on a setup error rather than letting it go live.

Next to the ``timetracer`` exporter, the other exporters get the spans without the
``timetracer.*`` payload attributes (:class:`PayloadStrippingExporter`); set
``TIMETRACER_STRIP_PAYLOADS=0`` to keep them, ``1`` to strip them even without ``timetracer``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

if TYPE_CHECKING:
    from timetracer_otel.config import Format

log = logging.getLogger("timetracer_otel")

EXPORTER_NAME = "timetracer"
# Environment variable names as strings: the launcher turns module attributes named OTEL_* into
# command-line flags, so none may be imported here under that name.
_EXPORTER_VARS = {
    "traces": "OTEL_TRACES_EXPORTER",
    "metrics": "OTEL_METRICS_EXPORTER",
    "logs": "OTEL_LOGS_EXPORTER",
}
_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
_SIGNAL_PROTOCOL = {s: f"OTEL_EXPORTER_OTLP_{s.upper()}_PROTOCOL" for s in _EXPORTER_VARS}
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def _names(value: str | None) -> list[str]:
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


def _installed(signal: str, name: str) -> bool:
    return bool(importlib.metadata.entry_points(group=f"opentelemetry_{signal}_exporter", name=name))


def _resolved(signal: str, name: str, env: MutableMapping[str, str]) -> str:
    # As opentelemetry.sdk._configuration resolves "otlp": by protocol, gRPC when unset.
    if name != "otlp":
        return name
    protocol = env.get(_SIGNAL_PROTOCOL[signal]) or env.get(_PROTOCOL) or "grpc"
    return _OTLP_BY_PROTOCOL.get(protocol.strip(), "otlp_proto_grpc")


def launcher_defaults(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Fill in the OTel settings ``TIMETRACER_MODE`` needs; return what was set.

    Only unset variables change: in ``replay`` every exporter defaults to ``none`` (replay needs
    no exporter and no network); in ``record`` traces default to ``timetracer`` and metrics and
    logs to ``none``; ``otlp`` uses HTTP when the gRPC exporter is not installed. If the result
    still names an exporter that is not installed, the instrumentation would be skipped, so
    this says what to set and exits with code 2.

        >>> env = {"TIMETRACER_MODE": "replay"}
        >>> launcher_defaults(env)
        ['OTEL_TRACES_EXPORTER=none', 'OTEL_METRICS_EXPORTER=none', 'OTEL_LOGS_EXPORTER=none']
    """
    launcher = env is None
    env = os.environ if env is None else env
    mode = (env.get("TIMETRACER_MODE") or "off").strip().lower()
    ours = EXPORTER_NAME in _names(env.get(_EXPORTER_VARS["traces"]))
    if launcher and (mode != "off" or ours):
        # Every TIMETRACER_* value, before the program starts: in the program, a bad one
        # fails OTel's configurator, which logs a traceback and runs the app unrecorded.
        from timetracer_otel.config import Settings
        from timetracer_otel.errors import TimetracerError

        try:
            Settings.from_env()
        except TimetracerError as exc:
            _fail(str(exc))
    if mode not in ("record", "replay") and not ours:
        return []
    changed: list[str] = []

    def default(var: str, value: str) -> None:
        if not (env.get(var) or "").strip():
            env[var] = value
            changed.append(f"{var}={value}")

    if mode == "replay":
        for var in _EXPORTER_VARS.values():
            default(var, "none")
    else:
        if mode == "record":
            default(_EXPORTER_VARS["traces"], EXPORTER_NAME)
        default(_EXPORTER_VARS["metrics"], "none")
        default(_EXPORTER_VARS["logs"], "none")
    wants_otlp = any("otlp" in _names(env.get(var)) for var in _EXPORTER_VARS.values())
    if wants_otlp and not _installed("traces", "otlp_proto_grpc") \
            and _installed("traces", "otlp_proto_http"):
        default(_PROTOCOL, "http/protobuf")
    for signal, var in _EXPORTER_VARS.items():
        for name in _names(env.get(var)):
            if not _installed(signal, _resolved(signal, name, env)):
                _fail(_missing_exporter_message(signal, var, name, env))
    return changed


def _missing_exporter_message(signal: str, var: str, name: str, env: MutableMapping[str, str]) -> str:
    resolved = _resolved(signal, name, env)
    if resolved == "otlp_proto_grpc":
        return (f"{var} asks for OTLP over gRPC, whose exporter is not installed, so "
                "opentelemetry-instrument would skip all instrumentation; set "
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf or pip install "
                "opentelemetry-exporter-otlp-proto-grpc.")
    return (f"{var}={env.get(var)} names the {signal} exporter {resolved!r}, which is not "
            f"installed, so opentelemetry-instrument would skip all instrumentation; install "
            f"it or remove it from {var}.")


def _fail(message: str) -> None:
    sys.stderr.write(f"timetracer-otel: {message}\n")
    sys.stderr.flush()
    os._exit(2)  # replay must never fall through to live dependencies


class PayloadStrippingExporter(SpanExporter):
    """Wraps another exporter so it never sees the ``timetracer.*`` payload attributes.

        >>> provider.add_span_processor(BatchSpanProcessor(PayloadStrippingExporter(OTLPSpanExporter())))
    """

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([strip_payloads(s) for s in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def __repr__(self) -> str:
        return f"PayloadStrippingExporter({self.inner!r})"


def strip_payloads(span: ReadableSpan) -> ReadableSpan:
    """``span`` itself when it carries no ``timetracer.*`` attribute, else a copy without them."""
    attrs = span.attributes or {}
    if not any(k.startswith("timetracer.") for k in attrs):
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={k: v for k, v in attrs.items() if not k.startswith("timetracer.")},
        events=span.events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _strip_other_exporters(env: MutableMapping[str, str]) -> int:
    """Wrap every configured exporter but ours in :class:`PayloadStrippingExporter`."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from timetracer_otel.exporters.exporter import CassetteSpanExporter

    flag = (env.get("TIMETRACER_STRIP_PAYLOADS") or "").strip().lower()
    ours = EXPORTER_NAME in _names(env.get(_EXPORTER_VARS["traces"]))
    if flag in ("0", "false", "no") or (not flag and not ours):
        return 0
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return 0
    wrapped = 0
    # The SDK keeps the configured processors privately; the attribute names are checked.
    for processor in getattr(provider._active_span_processor, "_span_processors", ()):
        holder: Any = getattr(processor, "_batch_processor", processor)
        for attr in ("_exporter", "span_exporter"):
            exporter = getattr(holder, attr, None)
            if isinstance(exporter, SpanExporter) and not isinstance(
                exporter, CassetteSpanExporter | PayloadStrippingExporter
            ):
                setattr(holder, attr, PayloadStrippingExporter(exporter))
                wrapped += 1
    return wrapped


def pre_instrument() -> None:
    """The ``opentelemetry_pre_instrument`` entry point: shims first, per ``TIMETRACER_MODE``."""
    from timetracer_otel import replay_shims
    from timetracer_otel.config import Mode, OnMiss, Settings
    from timetracer_otel.errors import TimetracerError
    from timetracer_otel.index import ReplayIndex
    from timetracer_otel.replay_shims.base import STATE

    try:
        settings = Settings.from_env()
    except TimetracerError as exc:
        _fail(str(exc))
        return
    if settings.mode is Mode.OFF:
        return
    if settings.mode is Mode.RECORD:
        from timetracer_otel.exporters.writer import finish_on_sigterm

        replay_shims.install()
        STATE.max_payload_bytes = settings.max_payload_bytes
        STATE.mode = Mode.RECORD
        _strip_other_exporters(os.environ)
        finish_on_sigterm()
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
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: _after_fork(index, settings.report))
    if settings.on_miss is OnMiss.RECORD:
        atexit.register(_keep_appended, source, settings.format, index.key_counts())


def _keep_appended(source: str, fmt: Format, known: dict[str, int]) -> None:
    """``on_miss=record``: the calls the cassette lacked join it (see ``add_interactions``)."""
    from timetracer_otel.errors import TimetracerError
    from timetracer_otel.exporters.storage import add_interactions
    from timetracer_otel.replay_shims.base import STATE

    appended = STATE.appended
    if not isinstance(appended, list) or not appended:
        return
    try:
        path = add_interactions(source, appended, "replay", fmt, known)
    except (TimetracerError, OSError) as exc:
        _UNKEPT.append(str(exc))  # in the report: `replay` exits 2 (it runs before that)
        sys.stderr.write(f"timetracer-otel: {exc}\n")
        return
    if path is None:
        sys.stderr.write("timetracer-otel: the calls the cassette lacked were already added to it "
                         "by another process\n")
        return
    sys.stderr.write(f"timetracer-otel: {len(appended)} call(s) the cassette lacked were recorded "
                     f"into {path}\n")


_UNKEPT: list[str] = []
# The index's report when this process was forked from the one that loaded it (if it was).
_FORKED_AT: list[Any] = [None]
# The process whose report is written (once: at exit, or as a multiprocessing child ends).
_REPORTED_BY: list[int] = [0]


def _after_fork(index: Any, path: str | None) -> None:
    """In a forked child: it reports only what it does itself (the parent reports the rest),
    and also when it ends as multiprocessing's forked processes do, with ``os._exit`` after
    multiprocessing's finalizers, without running ``atexit``."""
    _FORKED_AT[0] = index.report()
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None:
        # (a finalizer registered now would be cleared: multiprocessing clears them after the
        # fork, then runs its after-fork callbacks, so the finalizer is made by one of those)
        mp_util.register_after_fork(index, lambda index: mp_util.Finalize(
            None, _write_report, args=(index, path), exitpriority=-100))


def _write_report(index: Any, path: str | None) -> None:
    """At exit: this process's replay report. Every process of a replay (children, forked
    workers) writes its own file beside ``path`` (``TIMETRACER_REPORT``), named
    ``<path>.<pid>-<random>`` and renamed into place whole, so none overwrites another and a
    reader never sees half of one; ``timetracer-otel replay`` adds them all up."""
    import msgspec

    if _REPORTED_BY[0] == os.getpid():
        return
    _REPORTED_BY[0] = os.getpid()
    report = _own_part(index.report(), _FORKED_AT[0])
    report.unkept = list(_UNKEPT)
    if path:
        final = f"{path}.{os.getpid()}-{os.urandom(4).hex()}"
        tmp = final + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as fh:
                fh.write(msgspec.json.encode(report))
            os.replace(tmp, final)
        except OSError as exc:
            # (the replay then cannot count this process's calls: say so, and fail it)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            _fail(f"cannot write the replay report of process {os.getpid()} to {final} "
                  f"({exc.strerror or exc}), so its calls are not counted; replay again.")
    elif report.shape_matches or report.misses:
        sys.stderr.write(report.render() + "\n")


def _own_part(report: Any, at_fork: Any) -> Any:
    """``report`` less what ``at_fork`` (the report when this process was forked) held: the
    counts and lists only grow, so the parent's part is their start. Calls left unused stay
    as they are: ``replay`` keeps those no process used."""
    if at_fork is None:
        return report
    report.exact -= at_fork.exact
    for name in ("shape_matches", "misses", "stranded", "unsupported"):
        setattr(report, name, getattr(report, name)[len(getattr(at_fork, name)):])
    return report
