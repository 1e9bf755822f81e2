"""Replay shims: one module per library, each registering one line here.

``install()`` patches every shim whose library is importable (before any instrumentor runs),
``instrument()`` then runs those libraries' OpenTelemetry instrumentors on top.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterable

from timetracer_otel.replay_shims.base import Shim

log = logging.getLogger("timetracer_otel")

# library name -> (module that must be importable, "shim module:ShimClass").
# Adding a library is one new file and one line here.
REGISTRY: dict[str, tuple[str, str]] = {
    "httpx": ("httpx", "timetracer_otel.replay_shims.httpx:HttpxShim"),
    "requests": ("requests", "timetracer_otel.replay_shims.requests:RequestsShim"),
    "asyncpg": ("asyncpg", "timetracer_otel.replay_shims.asyncpg:AsyncpgShim"),
    "psycopg": ("psycopg", "timetracer_otel.replay_shims.psycopg:PsycopgShim"),
    "redis": ("redis", "timetracer_otel.replay_shims.redis:RedisShim"),
    "botocore": ("botocore", "timetracer_otel.replay_shims.botocore:BotocoreShim"),
    "pymongo": ("pymongo", "timetracer_otel.replay_shims.pymongo:PymongoShim"),
    "celery": ("celery", "timetracer_otel.replay_shims.celery:CeleryShim"),
    "asgi": ("opentelemetry.instrumentation.asgi", "timetracer_otel.replay_shims.asgi:AsgiShim"),
}

_installed: dict[str, Shim] = {}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def available(libraries: Iterable[str] | None = None) -> list[str]:
    """The registered libraries (optionally only ``libraries``) that are importable here."""
    names = list(REGISTRY) if libraries is None else [n for n in libraries if n in REGISTRY]
    return [n for n in names if _importable(REGISTRY[n][0])]


def load(library: str) -> Shim:
    if library not in _installed:
        module, _, cls = REGISTRY[library][1].partition(":")
        _installed[library] = getattr(importlib.import_module(module), cls)()
    return _installed[library]


def install(libraries: Iterable[str] | None = None) -> list[str]:
    """Patch the shims of every importable library; idempotent. Returns the libraries done."""
    done = []
    for name in available(libraries):
        try:
            load(name).install()
            done.append(name)
        except Exception:  # a broken optional library must not stop the others
            log.warning("timetracer-otel: could not install the %s shim", name, exc_info=True)
    return done


def instrument(libraries: Iterable[str] | None = None) -> None:
    """Run the OTel instrumentors of the installed shims (shims first, so they sit beneath)."""
    for name in install(libraries):
        try:
            load(name).instrument()
        except Exception:
            log.warning("timetracer-otel: could not instrument %s", name, exc_info=True)


def uninstall() -> None:
    for shim in _installed.values():
        shim.uninstall()
