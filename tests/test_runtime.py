"""record()/replay() as context managers and decorators; provider reuse; shims before instrumentors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from conftest import unreachable_port
from opentelemetry import trace

import timetracer_otel
from tests.upstream_app import app
from timetracer_otel import runtime
from timetracer_otel.cassette import Cassette, load_cassette, save_cassette
from timetracer_otel.config import Mode, Settings
from timetracer_otel.errors import CassetteError, ConfigError, ReplayMissError, ReplayUnsupportedError
from timetracer_otel.replay_shims.base import STATE


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


def test_a_recorded_error_that_cannot_be_rebuilt_is_refused_and_fails_the_replay(
    tmp_path: Path
) -> None:
    # A recorded error of a class this process cannot import (a cassette from another
    # codebase, say): refused in one sentence, and counted, so an app that catches it still
    # has a failed replay.
    port = unreachable_port()
    with timetracer_otel.record(dir=tmp_path) as rec, pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/gone")
    [path] = rec.paths
    cassette = load_cassette(path)
    [call] = cassette.interactions
    assert call.error is not None
    gone = msgspec.structs.replace(call, error={**call.error, "type": "no_such_module:Gone"})
    save_cassette(msgspec.structs.replace(
        cassette, spans=[gone if s is call else s for s in cassette.spans]), path)
    with timetracer_otel.replay(path) as rep:
        try:
            httpx.get(f"http://127.0.0.1:{port}/gone")
        except ReplayUnsupportedError as exc:
            assert "no_such_module:Gone cannot be rebuilt" in str(exc)
        else:
            raise AssertionError("the call was not refused")
    assert rep.report.unsupported == ["error no_such_module:Gone (cannot be rebuilt)"]
    assert rep.report.failed(misses_fail=True)


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


# --- runs that nest, overlap and repeat ----------------------------------------------------


def pages(paths: list[str]) -> list[str]:
    """The page parameter of every recorded call in ``paths``, in recorded order."""
    calls = sorted((i for p in paths for i in load_cassette(p).interactions), key=lambda i: i.start_ns)
    return [(i.label or "").rsplit("page=", 1)[-1] for i in calls]


def switched_off() -> bool:
    """STATE as the autouse fixture left it before the test: nothing recording or replaying."""
    writers = [d.writer for d in runtime._dispatch.values()]
    return (STATE.mode is Mode.OFF and STATE.index is None and not STATE.defer
            and writers == [None] * len(writers))


def test_a_nested_record_leaves_the_outer_one_recording(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    def get(page: int) -> None:
        httpx.get(f"{server.url}/items", params={"page": page})

    with timetracer_otel.record(dir=tmp_path / "outer") as outer:
        get(1)
        with timetracer_otel.record(dir=tmp_path / "inner") as inner:
            get(2)
        get(3)  # the inner exit used to switch recording off for good
    assert pages(outer.paths) == ["1", "3"] and pages(inner.paths) == ["2"]
    assert switched_off()

    # A recording inside a replay goes live, and the replay answers again once it ends.
    server.stop()
    with timetracer_otel.replay(outer.paths) as rep, pytest.raises(httpx.ConnectError):
        get(1)
        with timetracer_otel.record(dir=tmp_path / "live"):
            get(4)  # live: the server is down
    assert rep.report.exact == 1 and switched_off()


def test_overlapping_runs_in_tasks_each_keep_their_own_calls(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    async def get(client: httpx.AsyncClient, page: int) -> None:
        await client.get(f"{server.url}/items", params={"page": page})

    async def job(first: int, both: asyncio.Barrier, one_ended: asyncio.Event) -> list[str]:
        async with httpx.AsyncClient() as client:
            with timetracer_otel.record(dir=tmp_path / str(first)) as rec:
                await both.wait()  # both recordings are active from here on
                await get(client, first)
                await both.wait()
                if first == 1:
                    await get(client, first + 1)
                else:
                    await one_ended.wait()  # the first recording has ended: this one goes on
                    await get(client, first + 1)
            if first == 1:
                one_ended.set()
        return rec.paths

    async def both() -> list[list[str]]:
        barrier, one_ended = asyncio.Barrier(2), asyncio.Event()
        return await asyncio.gather(job(1, barrier, one_ended), job(10, barrier, one_ended))

    paths_1, paths_10 = asyncio.run(both())
    # Each task's calls in its own recording, although the second recording began later and
    # the first ended while the second still ran.
    assert pages(paths_1) == ["1", "2"] and pages(paths_10) == ["10", "11"]
    assert switched_off()


def test_a_decorated_replay_runs_again_and_twice_at_once(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    async def ajob(barrier: asyncio.Barrier | None = None) -> list[int]:
        pages = []
        async with httpx.AsyncClient() as client:
            for page in (1, 2):
                r = await client.get(f"{server.url}/items", params={"page": page})
                pages.append(int(r.json()["page"]))
                if barrier is not None:  # each call made while both runs are active
                    await barrier.wait()
        return pages

    rec = timetracer_otel.record(dir=tmp_path)
    assert asyncio.run(rec(ajob)()) == [1, 2]
    server.stop()

    rep = timetracer_otel.replay(rec.paths)
    replayed = rep(ajob)
    assert asyncio.run(replayed()) == [1, 2]
    assert asyncio.run(replayed()) == [1, 2]  # the second run replays the cassette afresh

    async def twice() -> list[list[int]]:
        barrier = asyncio.Barrier(2)
        return await asyncio.gather(replayed(barrier), replayed(barrier))

    assert asyncio.run(twice()) == [[1, 2], [1, 2]]  # each run answered from its own copy
    assert rep.report.summary() == "replay: 2 exact, 0 by shape, 0 missed, 0 recorded but unused"
    assert switched_off()

    with rep:  # a `with` block used again
        assert httpx.get(f"{server.url}/items", params={"page": 1}).json()["page"] == "1"
    with rep:
        assert httpx.get(f"{server.url}/items", params={"page": 1}).json()["page"] == "1"
    assert switched_off()


def test_generators_cannot_be_decorated(tmp_path: Path) -> None:
    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> AsyncIterator[int]:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match=r"is a generator function.*use a `with` block inside it"):
            timetracer_otel.record(dir=tmp_path)(fn)
        with pytest.raises(TypeError, match="is a generator function"):
            timetracer_otel.replay(tmp_path)(fn)


def test_bad_arguments_in_code_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"format='yaml' is not valid; use one of: msgpack, json\."):
        timetracer_otel.record(dir=tmp_path, format="yaml")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="libraries names 'httpz'"):
        timetracer_otel.record(dir=tmp_path, libraries=["httpz"])
    with pytest.raises(ConfigError, match="libraries names 'httpz'"):
        timetracer_otel.replay(tmp_path, libraries=["httpz"])
    with pytest.raises(ConfigError, match="on_miss=None is not valid; use one of: error, passthrough"):
        timetracer_otel.replay(tmp_path, on_miss=None)  # type: ignore[arg-type]
    assert timetracer_otel.replay(tmp_path, live="HTTPX").live == frozenset({"httpx"})


def test_replay_on_miss_record_keeps_new_calls_in_the_cassette_it_replays(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(app)

    def job(*pages: int) -> list[tuple[type, bytes]]:
        responses = [httpx.get(f"{server.url}/items", params={"page": p}) for p in pages]
        return [(type(r.content), r.content) for r in responses]

    with timetracer_otel.record(dir=tmp_path / "dir") as rec:
        first = job(1)
    [path] = rec.paths
    file_copy = tmp_path / "one.msgpack"
    file_copy.write_bytes(Path(path).read_bytes())
    # The upstream counts its requests ("n"): a live answer differs from every other one.
    with timetracer_otel.replay(file_copy, on_miss="record") as to_file:
        to_file_answers = job(1, 2)  # page 2 goes live
    monkeypatch.setenv("TIMETRACER_FORMAT", "json")  # a directory's new cassette: this format
    with timetracer_otel.replay(tmp_path / "dir", on_miss="record") as to_dir:
        to_dir_answers = job(1, 3)
    assert to_file_answers[0] == first[0] == to_dir_answers[0]
    assert to_file.written == [str(file_copy)] and len(to_file.appended) == 1
    [added] = to_dir.written
    assert Path(added).parent == tmp_path / "dir" and Path(added).name.startswith("appended-")
    assert Path(added).suffix == ".json" and Path(added).read_bytes().lstrip().startswith(b"{")
    server.stop()
    with timetracer_otel.replay(file_copy, strict=True) as rep:
        assert job(1, 2) == to_file_answers
    assert rep.report.summary() == "replay: 2 exact, 0 by shape, 0 missed, 0 recorded but unused"
    with timetracer_otel.replay(tmp_path / "dir", strict=True) as rep:
        assert job(1, 3) == to_dir_answers
    assert rep.report.summary() == "replay: 2 exact, 0 by shape, 0 missed, 0 recorded but unused"


def test_a_reused_replay_on_miss_record_adds_a_new_call_once(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
    [path] = rec.paths

    @timetracer_otel.replay(path, on_miss="record")
    def job() -> None:
        for page in (1, 2):
            httpx.get(f"{server.url}/items", params={"page": page})

    for _ in range(3):
        job()  # the first run records page 2; the next ones replay it
    assert [i.label.rsplit("=", 1)[-1] for i in load_cassette(path).interactions] == ["1", "2"]


def test_a_run_ends_even_when_its_end_raises(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Interrupted(SpanProcessor):
        armed = False

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            if self.armed:
                raise KeyboardInterrupt  # Ctrl-C while the app's processors flush
            return True

    stop = Interrupted()
    runtime.sdk_provider().add_span_processor(stop)
    rec = timetracer_otel.record(dir=tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt), rec:  # the block's end raises
            with trace.get_tracer("tests").start_as_current_span("job-before-ctrl-c"):
                pass
            stop.armed = True
    finally:
        stop.armed = False
    assert switched_off()
    # Its writer was flushed and closed all the same: the span of the block is in its cassette.
    (path,) = rec.paths
    assert [s.name for s in load_cassette(path).spans] == ["job-before-ctrl-c"]


def _interrupted_switch(monkeypatch: pytest.MonkeyPatch, mode: Mode) -> list[Mode]:
    """Ctrl-C inside the first switch of STATE to ``mode``, half of it written; returns the
    modes of every switch made."""
    write = runtime._Switch.write
    calls: list[Mode] = []

    def interrupted(self: Any) -> None:
        calls.append(self.mode)
        if self.mode is mode and calls.count(mode) == 1:
            STATE.mode = self.mode  # half of it written, then Ctrl-C
            raise KeyboardInterrupt
        write(self)

    monkeypatch.setattr(runtime._Switch, "write", interrupted)
    return calls


def test_a_run_interrupted_while_it_begins_never_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _interrupted_switch(monkeypatch, Mode.REPLAY)
    with pytest.raises(KeyboardInterrupt):
        timetracer_otel.replay(_empty_cassette(tmp_path)).__enter__()
    assert calls == [Mode.REPLAY, Mode.OFF] and runtime._active == []
    with timetracer_otel.replay(_empty_cassette(tmp_path)):
        pass
    assert switched_off()


def test_a_run_interrupted_while_it_ends_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _interrupted_switch(monkeypatch, Mode.OFF)
    rec = timetracer_otel.record(dir=tmp_path)
    with pytest.raises(KeyboardInterrupt), rec:
        pass
    assert calls == [Mode.RECORD, Mode.OFF, Mode.OFF]
    assert switched_off() and runtime._active == [] and runtime._base is None


def test_a_signal_handler_putting_state_while_a_run_switches_does_not_deadlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A handler (provider.shutdown() on SIGTERM, say) runs on the thread that is switching,
    # between two of its bytecodes: here, inside the switch's write.
    import threading

    write = runtime._Switch.write
    handled = []

    def signalled(self: Any) -> None:
        if not handled:
            handled.append(self.mode)
            STATE.put(max_payload_bytes=1234)
        write(self)

    monkeypatch.setattr(runtime._Switch, "write", signalled)
    limit = STATE.max_payload_bytes
    during = []
    try:
        def job() -> None:
            with timetracer_otel.replay(_empty_cassette(tmp_path)):
                during.append(STATE.max_payload_bytes)  # put once the begin was complete

        worker = threading.Thread(target=job, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "STATE.put from inside a switch deadlocked"
        assert handled == [Mode.REPLAY] and during == [1234] and switched_off()
        assert STATE.max_payload_bytes == 1234  # outlasts the run, as any outside put does
    finally:
        STATE.max_payload_bytes = limit


def test_runs_ended_out_of_order_leave_calls_to_the_latest(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    first, middle, last = (timetracer_otel.record(dir=tmp_path / name) for name in ("f", "m", "l"))
    first.__enter__()
    middle.__enter__()
    last.__enter__()
    middle.__exit__()  # out of order, in the same context
    httpx.get(f"{server.url}/items", params={"page": 1})
    last.__exit__()
    first.__exit__()
    assert (pages(first.paths), pages(middle.paths), pages(last.paths)) == ([], [], ["1"])
    assert switched_off()


def test_a_failure_to_keep_appended_calls_does_not_hide_the_blocks_error(
    serve: Any, tmp_path: Path
) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
    [path] = rec.paths

    class AppError(Exception):
        pass

    def job() -> None:
        httpx.get(f"{server.url}/items", params={"page": 2})  # missing: goes live, appended
        Path(path).unlink()  # nowhere left to keep it

    Path(tmp_path / "copy").write_bytes(Path(path).read_bytes())
    with pytest.raises(AppError), timetracer_otel.replay(path, on_miss="record", strict=True):
        job()
        raise AppError  # the app's own error is what the caller sees
    Path(path).write_bytes(Path(tmp_path / "copy").read_bytes())
    with pytest.raises(CassetteError, match="is not a cassette file or directory"), \
            timetracer_otel.replay(path, on_miss="record", strict=True):
        job()  # without an error of its own, the lost calls are the error
    assert switched_off()


def _empty_cassette(tmp_path: Path) -> Path:
    return save_cassette(Cassette(id="e", name="empty", created="2026-11-28T00:00:00+00:00"),
                         tmp_path / "empty.msgpack")


def test_what_others_set_during_a_run_outlasts_it(tmp_path: Path) -> None:
    from timetracer_otel.exporters import CassetteSpanProcessor

    for run in (timetracer_otel.replay(_empty_cassette(tmp_path)),
                timetracer_otel.record(dir=tmp_path / "rec")):  # (a recording defers too)
        with run:
            processor = CassetteSpanProcessor(dir=str(tmp_path / "out"))  # defers for the process
        assert STATE.defer and STATE.mode is Mode.OFF  # the run's end used to put defer back
        processor.shutdown()
        assert not STATE.defer


def test_a_held_mode_nests_with_runs_like_one_of_them(tmp_path: Path) -> None:
    # The pytest plugin's recording: a fixture's replay is active, the plugin records the
    # test, and the test's own record() ends inside it.
    with timetracer_otel.replay(_empty_cassette(tmp_path)):
        held = runtime.hold_mode(Mode.RECORD)
        with timetracer_otel.record(dir=tmp_path / "own"):
            pass
        assert STATE.mode is Mode.RECORD  # still the plugin's recording
        runtime.release(held)
        assert STATE.mode is Mode.REPLAY
    assert switched_off()


def test_runs_that_lacked_the_same_call_keep_it_once(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
    [path] = rec.paths

    async def job(barrier: asyncio.Barrier) -> None:
        async with httpx.AsyncClient() as client:
            for page in (1, 2):
                await client.get(f"{server.url}/items", params={"page": page})
                await barrier.wait()

    replayed = timetracer_otel.replay(path, on_miss="record", strict=True)(job)

    async def twice() -> None:
        barrier = asyncio.Barrier(2)
        await asyncio.gather(replayed(barrier), replayed(barrier))

    asyncio.run(twice())  # both runs lacked page 2 and recorded it live
    # Two replays of one file, the second loaded before the first kept its call.
    one = timetracer_otel.replay(path, on_miss="record", strict=True)
    other = timetracer_otel.replay(path, on_miss="record", strict=True)
    for rep in (one, other):
        with rep:
            httpx.get(f"{server.url}/items", params={"page": 3})
    labels = [i.label.rsplit("=", 1)[-1] for i in load_cassette(path).interactions]
    assert labels == ["1", "2", "3"] and len(one.written) == 1 and other.written == []


def test_overlapping_replays_each_keep_their_own_on_miss_and_live(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = httpx.get(f"{server.url}/items", params={"page": 1}).json()
    [path] = rec.paths

    async def job(rep: Any, page: int, all_begun: asyncio.Barrier) -> Any:
        with rep:
            await all_begun.wait()  # every run is active from here on; the last begun is `live`
            async with httpx.AsyncClient() as client:
                try:
                    return (await client.get(f"{server.url}/items", params={"page": page})).json()
                except ReplayMissError:
                    return "miss"

    async def together() -> list[Any]:
        barrier = asyncio.Barrier(3)
        return await asyncio.gather(
            job(timetracer_otel.replay(path, strict=True), 99, barrier),
            job(timetracer_otel.replay(path, strict=True, on_miss="passthrough"), 98, barrier),
            job(timetracer_otel.replay(path, live=["httpx"]), 1, barrier),
        )

    strict, passthrough, live = asyncio.run(together())
    assert strict == "miss"  # its own on_miss="error", although later runs let misses go live
    assert passthrough["page"] == "98"  # went live, as its run allows
    assert live["page"] == "1" and live != recorded  # httpx stayed live in its run: a new count
    assert switched_off()


def _child_request(url: str, page: int) -> None:
    """A forked child's request: one inbound span and its dependency call. It returns
    without closing anything; multiprocessing then ends the child with os._exit."""
    with trace.get_tracer("tests").start_as_current_span(f"GET /child{page}",
                                                         kind=trace.SpanKind.SERVER):
        httpx.get(f"{url}/items", params={"page": page})


def test_children_forked_while_recording_write_their_own_cassettes(
    serve: Any, tmp_path: Path
) -> None:
    """A process that forks after its writer has started (multiprocessing, Celery's prefork
    pool, gunicorn --preload): the thread and the writer process are the parent's, so each
    child starts its own, and writes its calls before os._exit ends it; the parent's
    recording goes on unharmed."""
    import multiprocessing

    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
        assert rec.writer is not None and rec.writer.flush(process=True)  # thread and process up
        fork = multiprocessing.get_context("fork")
        children = [fork.Process(target=_child_request, args=(server.url, n)) for n in (2, 3)]
        for child in children:
            child.start()
        for child in children:
            child.join(60)
        httpx.get(f"{server.url}/items", params={"page": 4})
    assert [child.exitcode for child in children] == [0, 0]
    assert pages(rec.paths) == ["1", "4"]  # the parent's own
    written = sorted(tmp_path.glob("*/*.msgpack"))
    by_child = {p: load_cassette(p) for p in written if str(p) not in rec.paths}
    assert sorted(c.name for c in by_child.values()) == ["GET__child2", "GET__child3"]
    server.stop()
    for path, cassette in by_child.items():
        page = cassette.name[-1]
        with timetracer_otel.replay(str(path)) as rep:
            body = httpx.get(f"{server.url}/items", params={"page": page}).json()
        assert body["page"] == page and rep.report.exact == 1


def _child_replayed_call(url: str) -> None:
    assert httpx.get(f"{url}/items", params={"page": 1}, timeout=2).json()["page"] == "1"


def test_children_forked_while_replaying_answer_even_when_a_thread_held_the_index(
    serve: Any, tmp_path: Path
) -> None:
    """A thread of the parent reading the replay's report (it walks the index under its
    lock) while the parent forks: a child that inherited that lock held, with no thread to
    release it, hung on its first replayed call for good."""
    import multiprocessing
    import threading

    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec, httpx.Client() as client:
        for _ in range(2000):
            client.get(f"{server.url}/items", params={"page": 1})
    server.stop()
    fork = multiprocessing.get_context("fork")
    stop = threading.Event()
    exits = []
    with timetracer_otel.replay(rec.paths) as rep:

        def read_reports() -> None:
            while not stop.is_set():
                assert rep.report.misses == []

        reader = threading.Thread(target=read_reports)
        reader.start()
        try:
            for _ in range(12):
                child = fork.Process(target=_child_replayed_call, args=(server.url,))
                child.start()
                child.join(10)
                if child.exitcode is None:  # hung: stopped, and counted as such
                    child.kill()
                    child.join()
                exits.append(child.exitcode)
        finally:
            stop.set()
            reader.join()
    assert exits == [0] * 12
