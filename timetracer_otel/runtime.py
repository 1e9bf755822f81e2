"""``record()`` and ``replay()``: the in-code way in, as context managers or decorators.

    >>> with timetracer_otel.record(dir="cassettes") as rec:
    ...     httpx.get("http://127.0.0.1:8000/items")
    >>> rec.paths
    ['cassettes/2026-11-26/script__3f9a....msgpack']
    >>> with timetracer_otel.replay(rec.paths[0]) as rep:
    ...     httpx.get("http://127.0.0.1:8000/items")      # answered from the cassette
    >>> rep.report.summary()
    'replay: 1 exact, 0 by shape, 0 missed, 0 recorded but unused'
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from timetracer_otel import replay_shims
from timetracer_otel.cassette import Cassette, Format
from timetracer_otel.config import Mode, OnMiss, Settings, library_names
from timetracer_otel.exporters.storage import storage_for
from timetracer_otel.exporters.writer import CassetteWriter
from timetracer_otel.index import ReplayIndex, ReplayReport
from timetracer_otel.replay_shims.base import STATE

F = TypeVar("F", bound=Callable[..., Any])
_A = TypeVar("_A", bound="_Activation")
_lock = threading.Lock()


class _Dispatch(SpanProcessor):
    """One processor per provider (the SDK cannot remove processors); it forwards finished
    spans to whichever recording is active."""

    def __init__(self) -> None:
        self.writer: CassetteWriter | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        writer = self.writer
        if writer is not None:
            writer.submit(span)

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000) if self.writer is not None else True


_dispatch: dict[int, _Dispatch] = {}


def sdk_provider(service_name: str | None = None) -> TracerProvider:
    """The application's SDK TracerProvider, or a new one set globally when only the API's
    default (proxy) provider exists."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    attrs = {"service.name": service_name} if service_name else {}
    new = TracerProvider(resource=Resource.create(attrs))
    trace.set_tracer_provider(new)
    got = trace.get_tracer_provider()
    if not isinstance(got, TracerProvider):
        raise RuntimeError("a non-SDK TracerProvider is already set; timetracer needs the SDK one")
    return got


def _dispatch_for(provider: TracerProvider) -> _Dispatch:
    d = _dispatch.get(id(provider))
    if d is None:
        d = _dispatch[id(provider)] = _Dispatch()
        provider.add_span_processor(d)
    return d


class _Activation:
    """Context manager and decorator (sync or async functions) sharing enter/exit."""

    def __enter__(self: _A) -> _A:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        self._exit()

    def _enter(self) -> None:
        raise NotImplementedError

    def _exit(self) -> None:
        raise NotImplementedError

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class Recording(_Activation):
    """An active recording; ``paths`` lists the cassettes written once it has ended."""

    def __init__(
        self,
        dir: str | Path | None = None,
        *,
        format: Format | None = None,
        libraries: Iterable[str] | None = None,
        service_name: str | None = None,
    ) -> None:
        s = Settings.from_env()
        self.dir = str(dir) if dir is not None else s.dir
        self.format: Format = format or s.format  # type: ignore[assignment]
        self.libraries = list(libraries) if libraries is not None else None
        self.service_name = service_name
        self.settings = s
        self.paths: list[str] = []  # not the cassettes themselves: memory stays bounded
        self.writer: CassetteWriter | None = None
        self._saved: tuple[Any, ...] = ()

    def _enter(self) -> None:
        storage = storage_for(self.dir)
        storage.check()
        provider = sdk_provider(self.service_name)
        replay_shims.instrument(self.libraries)
        STATE.max_payload_bytes = self.settings.max_payload_bytes  # before the writer sends it on
        self.writer = CassetteWriter(
            storage,
            fmt=self.format,
            via="processor",
            sample_rate=self.settings.sample_rate,
            errors_only=self.settings.errors_only,
        )
        with _lock:
            self._saved = (STATE.mode, STATE.defer)
            STATE.mode = Mode.RECORD
            STATE.defer = not self.settings.span_payloads  # shims may leave calls to this writer
            _dispatch_for(provider).writer = self.writer

    def _exit(self) -> None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            provider.force_flush()  # spans still queued in the app's own batch processors
        with _lock:
            STATE.mode, STATE.defer = self._saved
            d = _dispatch.get(id(provider))
            if d is not None and d.writer is self.writer:
                d.writer = None
        assert self.writer is not None
        self.writer.flush(process=True)
        self.writer.close()
        self.paths = list(self.writer.written)


class Replaying(_Activation):
    """An active replay; ``report`` tells what matched, by shape, missed and went unused."""

    def __init__(
        self,
        cassette: str | Path | Sequence[str | Path] | Cassette,
        *,
        on_miss: str | OnMiss = OnMiss.ERROR,
        strict: bool = False,
        live: Iterable[str] = (),
        libraries: Iterable[str] | None = None,
    ) -> None:
        if isinstance(cassette, Cassette):
            self.index = ReplayIndex([("<cassette>", cassette)], strict=strict)
        else:
            paths = [cassette] if isinstance(cassette, str | Path) else list(cassette)
            self.index = ReplayIndex.from_paths(paths, strict=strict)
        self.on_miss = on_miss if isinstance(on_miss, OnMiss) else OnMiss.parse(on_miss, "on_miss")
        self.live = library_names(",".join(live), "live")  # a misspelt name is an error
        self.libraries = list(libraries) if libraries is not None else None
        self._saved: tuple[Any, ...] = ()

    @property
    def report(self) -> ReplayReport:
        return self.index.report()

    def _enter(self) -> None:
        replay_shims.instrument(self.libraries)
        with _lock:
            self._saved = (STATE.mode, STATE.index, STATE.on_miss, STATE.live, STATE.appended)
            STATE.mode = Mode.REPLAY
            STATE.index = self.index
            STATE.on_miss = self.on_miss
            STATE.live = self.live
            STATE.appended = []

    def _exit(self) -> None:
        with _lock:
            self.appended = STATE.appended
            STATE.mode, STATE.index, STATE.on_miss, STATE.live, STATE.appended = self._saved


def record(
    dir: str | Path | None = None,
    *,
    format: Format | None = None,
    libraries: Iterable[str] | None = None,
    service_name: str | None = None,
) -> Recording:
    """Record every dependency call made inside the block (or decorated function).

    Reuses the application's SDK TracerProvider, or installs one; installs the shims, then
    the OTel instrumentors of the importable libraries.
    """
    return Recording(dir, format=format, libraries=libraries, service_name=service_name)


def replay(
    cassette: str | Path | Sequence[str | Path] | Cassette,
    *,
    on_miss: str | OnMiss = OnMiss.ERROR,
    strict: bool = False,
    live: Iterable[str] = (),
    libraries: Iterable[str] | None = None,
) -> Replaying:
    """Answer every dependency call inside the block from ``cassette`` (a file, a directory,
    several of them, or a loaded :class:`Cassette`).

    ``on_miss``: ``"error"`` raises ReplayMissError, ``"passthrough"`` calls the real
    dependency, ``"record"`` calls it and keeps the interaction in ``appended``.
    ``strict`` turns off shape matching; ``live`` names libraries that stay live.
    """
    return Replaying(cassette, on_miss=on_miss, strict=strict, live=live, libraries=libraries)
