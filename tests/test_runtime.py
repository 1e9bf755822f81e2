"""record()/replay() as context managers and decorators; provider reuse; shims before instrumentors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

import timetracer_otel
from tests.upstream_app import app
from timetracer_otel.cassette import load_cassette
from timetracer_otel.config import Settings
from timetracer_otel.errors import ConfigError, ReplayUnsupportedError


def test_decorators_on_sync_and_async_functions(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    def job() -> int:
        return int(httpx.get(f"{server.url}/items", params={"page": 3}).json()["page"])

    async def ajob() -> int:
        async with httpx.AsyncClient() as c:
            r = await c.get(f"{server.url}/items", params={"page": 4})
        return int(r.json()["page"])

    rec = timetracer_otel.record(dir=tmp_path / "sync")
    arec = timetracer_otel.record(dir=tmp_path / "async")
    assert rec(job)() == 3 and asyncio.run(arec(ajob)()) == 4
    assert len(rec.paths) == 1 and len(arec.paths) == 1
    server.stop()
    assert timetracer_otel.replay(rec.paths)(job)() == 3
    assert asyncio.run(timetracer_otel.replay(arec.paths)(ajob)()) == 4


def run_python(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=cwd, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_record_reuses_the_applications_sdk_provider(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    out = run_python(
        f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import httpx, timetracer_otel
        mine = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(mine))
        trace.set_tracer_provider(provider)
        with timetracer_otel.record(dir="c") as rec:
            httpx.get("{server.url}/items")
        assert trace.get_tracer_provider() is provider
        print(len(rec.paths), [s.name for s in mine.get_finished_spans()])
        """,
        tmp_path,
    )
    assert out.strip() == "1 ['GET']"  # the app's own exporter still got the span


def test_record_installs_a_provider_when_only_the_api_default_exists(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    out = run_python(
        f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        import httpx, timetracer_otel
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        with timetracer_otel.record(dir="c", service_name="svc") as rec:
            httpx.get("{server.url}/items")
        print(type(trace.get_tracer_provider()).__name__, len(rec.paths))
        print(timetracer_otel.load_cassette(rec.paths[0]).resource["service.name"])
        """,
        tmp_path,
    )
    assert out.split() == ["TracerProvider", "1", "svc"]


def test_shims_sit_beneath_an_instrumentor_that_ran_first(serve: Any, tmp_path: Path) -> None:
    """Even if the app instrumented httpx before record(), the shim slides under the wrapper:
    the payload lands on the instrumentation's own span, not on a second span."""
    server = serve(app)
    out = run_python(
        f"""
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        HTTPXClientInstrumentor().instrument()
        import httpx, timetracer_otel
        with timetracer_otel.record(dir="c") as rec:
            httpx.get("{server.url}/items")
        c = timetracer_otel.load_cassette(rec.paths[0])
        print(len(c.spans), c.spans[0].library, c.spans[0].attributes.get("http.request.method",
              c.spans[0].attributes.get("http.method")))
        """,
        tmp_path,
    )
    assert out.split() == ["1", "httpx", "GET"]


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_the_payload_limit_from_the_environment_truncates_and_replay_refuses(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    # A small limit: the /blob answer (256 bytes) is stored truncated, the small /items one
    # whole; replaying the truncated call says so instead of answering with half a body.
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", "200")
    monkeypatch.setenv("TIMETRACER_WRITER", writer)
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        small = httpx.get(f"{server.url}/items", params={"page": 1}).content
        httpx.get(f"{server.url}/blob")
    interactions = {i.label.split("?")[0].rsplit("/", 1)[-1]: i
                    for i in load_cassette(rec.paths[0]).interactions}
    assert interactions["items"].truncated is False and interactions["blob"].truncated is True
    assert interactions["blob"].response is None
    server.stop()
    with timetracer_otel.replay(rec.paths):
        assert httpx.get(f"{server.url}/items", params={"page": 1}).content == small
        with pytest.raises(ReplayUnsupportedError, match="TIMETRACER_MAX_PAYLOAD_BYTES"):
            httpx.get(f"{server.url}/blob")


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1", "0", "2.5", "many"])
def test_a_bad_payload_limit_is_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", value)
    with pytest.raises(ConfigError, match="TIMETRACER_MAX_PAYLOAD_BYTES"):
        Settings.from_env()



@pytest.mark.parametrize("var", ["TIMETRACER_STRICT", "TIMETRACER_ERRORS_ONLY", "TIMETRACER_SPAN_PAYLOADS"])
def test_yes_no_settings_refuse_other_words(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "maybe")  # used to mean no, silently
    with pytest.raises(ConfigError, match=f"{var}='maybe' is not valid"):
        Settings.from_env()
    for word, value in (("Yes", True), ("on", True), ("0", False), ("", False)):
        monkeypatch.setenv(var, word)
        assert getattr(Settings.from_env(), var.removeprefix("TIMETRACER_").lower()) is value


def test_replay_in_code_refuses_a_misspelt_live_library(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="live names 'htpx'"):
        timetracer_otel.replay(tmp_path, live=["htpx"])
