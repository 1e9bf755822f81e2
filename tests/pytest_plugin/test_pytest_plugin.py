"""The pytest plugin, run on a sample project with pytester in a subprocess (the plugin
patches process-wide state, so every run gets a fresh interpreter)."""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import unreachable_port

import timetracer_otel
from timetracer_otel.cassette import Cassette, load_cassette, save_cassette

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
SAMPLE = HERE / "sample"


HITS: list[str] = []


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A real HTTP upstream (served by uvicorn): echoes the path and query as JSON."""
    assert scope["type"] == "http"
    HITS.append(scope["path"])
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"path": scope["path"], "query": scope["query_string"].decode()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copy(SAMPLE / "sample_conftest.py", pytester.path / "conftest.py")
    shutil.copy(SAMPLE / "sample_tests.py", pytester.path / "test_sample.py")
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


# Plugins the sample does not use; leaving them out saves about a second per run.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:faker",
         "-p", "no:benchmark", "-p", "no:xdist.looponfail")


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess(*QUIET, *args)


def cassettes(root: Path) -> dict[str, Cassette]:
    base = root / "cassettes" / "test_sample"
    return {p.name: load_cassette(p) for p in sorted(base.glob("*.json"))}


def make_items(database: str) -> None:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}", autocommit=True) as c:
        c.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, added date)")
        c.execute("INSERT INTO items VALUES (1, 'widget', 1.25, '2024-01-02'), "
                  "(2, 'gadget', 2.50, '2024-02-03'), (3, 'gizmo', 9.99, '2024-03-04')")


def test_record_then_replay_offline_then_miss_then_rewrite(
    project: pytest.Pytester, serve: Any, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_items(pg_database)
    server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    monkeypatch.setenv("SAMPLE_PG_DSN", f"postgresql://postgres@127.0.0.1:5432/{pg_database}")

    first = run(project)
    first.assert_outcomes(passed=6)
    recorded = cassettes(project.path)
    assert sorted(recorded) == [
        "TestMore.test_psycopg.json",
        "TestMore.test_requests[1].json",
        "TestMore.test_requests[22].json",
        "test_report.json",
        "test_search.json",
    ]
    search = recorded["test_search.json"]
    # The fixture's setup and teardown calls are in the test's one cassette, in order.
    assert [s.label for s in search.interactions] == [
        f"GET {server.url}/health",
        f"GET {server.url}/search/widgets?q=blue",
        f"GET {server.url}/cleanup",
    ]
    assert search.recorder.via == "pytest"
    # The async fixture connected and counted rows before the test body ran.
    report_libs = [s.library for s in recorded["test_report.json"].interactions]
    assert report_libs[0] == "asyncpg" and report_libs[-1] == "httpx", report_libs
    assert report_libs.count("httpx") == 1
    assert "psycopg" in {s.library for s in recorded["TestMore.test_psycopg.json"].interactions}
    assert [s.library for s in recorded["TestMore.test_requests[22].json"].interactions] == ["requests"]

    # Both services gone: the second run can only pass from the cassettes. Same database name,
    # a port where nothing listens (the database name is part of a SQL key, host and port not).
    server.stop()
    monkeypatch.setenv("SAMPLE_PG_DSN", f"postgresql://postgres@127.0.0.1:{unreachable_port()}/{pg_database}")
    second = run(project, "--timetracer-record-mode=none", "--timetracer-block-network")
    second.assert_outcomes(passed=6)
    assert all(c.id == recorded[n].id for n, c in cassettes(project.path).items())  # not rewritten

    monkeypatch.setenv("SAMPLE_KIND", "gadgets")
    monkeypatch.setenv("SAMPLE_COLUMN", "lower(name)")
    third = run(project, "-k", "test_search or test_report")
    third.assert_outcomes(failed=2)
    out = third.stdout.str()
    assert f"No recorded httpx call matches GET {server.url}/search/gadgets?q=blue" in out
    assert f"GET {server.url}/search/widgets?q=blue (unused)" in out
    assert "No recorded asyncpg call matches fetch SELECT id, lower(name) AS name" in out
    assert "statement: recorded 'SELECT id, name AS name" in out
    assert "--timetracer-record-mode=rewrite 'test_sample.py::test_search'" in out

    server = serve(upstream, port=server.port)
    monkeypatch.setenv("SAMPLE_PG_DSN", f"postgresql://postgres@127.0.0.1:5432/{pg_database}")
    fourth = run(project, "--timetracer-record-mode=rewrite")
    fourth.assert_outcomes(passed=6)
    rewritten = cassettes(project.path)
    assert all(c.id != recorded[n].id for n, c in rewritten.items())
    assert [s.label for s in rewritten["test_search.json"].interactions][1] == (
        f"GET {server.url}/search/gadgets?q=blue"
    )
    assert any("lower(name)" in (s.label or "") for s in rewritten["test_report.json"].interactions)


def load_service() -> Any:
    spec = importlib.util.spec_from_file_location("sample_service", SAMPLE / "sample_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replay_dir_turns_recorded_requests_into_tests(
    pytester: pytest.Pytester, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    upstream_server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", upstream_server.url)
    recorded = tmp_path / "traffic"
    with timetracer_otel.record(dir=recorded, format="json"):
        service = serve(OpenTelemetryMiddleware(load_service().app))
        for oid in range(1, 21):  # an untraced client, like a caller in another process
            conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
            conn.request("GET", f"/orders/{oid}")
            assert conn.getresponse().status == 200
            conn.close()
        service.stop()
    upstream_server.stop()  # replay answers the upstream call from each cassette
    assert len(list(recorded.rglob("*.json"))) == 20

    shutil.copy(SAMPLE / "sample_service.py", pytester.path / "svc.py")
    pytester.makeini("[pytest]\n")
    args = ("--timetracer-replay-dir", str(recorded), "--timetracer-asgi-app", "svc:app", "-v")
    passing = run(pytester, *args)
    passing.assert_outcomes(passed=20)
    passing.stdout.re_match_lines([r".*::GET /orders/\{id\} \[trace [0-9a-f]{8}\] PASSED.*"])

    svc = pytester.path / "svc.py"
    svc.write_text(svc.read_text().replace("# CHANGE-ME", "+ (1 if oid == 7 else 0)"))
    failing = run(pytester, *args)
    failing.assert_outcomes(passed=19, failed=1)
    out = failing.stdout.str()
    assert "GET /orders/{id} [trace " in out
    assert "the app's answer differs from the recording" in out
    assert "body.total: recorded 82, now 83" in out, out
    # An app that cannot be imported: said once per test, not chained to itself.
    broken = run(pytester, "--timetracer-replay-dir", str(recorded), "--timetracer-asgi-app",
                 "no_such_module:app", "-k", "trace")
    text = broken.stdout.str()
    assert "cannot import 'no_such_module'" in text
    assert "During handling of the above exception" not in text, text


def labels(path: Path) -> list[str]:
    return [s.label or "" for s in load_cassette(path).interactions]


def test_modes_strictness_hybrid_blocking_xdist_anyio(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(SAMPLE / "sample_modes.py", pytester.path / "test_modes.py")
    pytester.makeini("[pytest]\ntimetracer_cassette_dir = recorded\n")
    server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    base = pytester.path / "recorded" / "test_modes"

    # Recorded by two xdist workers, each writing the cassettes of the tests it ran.
    first = run(pytester, "-n", "2", "-k", "not outside and not never")
    first.assert_outcomes(passed=8)
    assert sorted(p.name for p in base.iterdir()) == [
        "test_anyio[asyncio].json", "test_anyio[trio].json", "test_changes.json", "test_fewer.json",
        "test_fewer_allowed.json", "test_grows.json", "test_hybrid.json", "test_raw_loopback.json",
    ]
    assert labels(base / "test_grows.json") == [f"GET {server.url}/grow/0", f"GET {server.url}/grow/1"]
    assert labels(base / "test_hybrid.json") == [f"GET {server.url}/h"]  # requests stayed live
    assert labels(base / "test_raw_loopback.json") == []

    monkeypatch.setenv("GROW", "3")
    run(pytester, "--timetracer-record-mode=new_episodes", "-k", "grows").assert_outcomes(passed=1)
    assert labels(base / "test_grows.json")[2:] == [f"GET {server.url}/grow/2"]
    monkeypatch.setenv("GROW", "1")
    run(pytester, "--timetracer-record-mode=all", "-k", "grows").assert_outcomes(passed=1)
    assert labels(base / "test_grows.json") == [f"GET {server.url}/grow/0"]
    # new_episodes records a call that only resembles a recorded one (another query value),
    # rather than answering it with that one's response, and drops the call it replaced (so
    # the `none` run below finds nothing unused).
    monkeypatch.setenv("V", "b")
    run(pytester, "--timetracer-record-mode=new_episodes", "-k", "changes").assert_outcomes(passed=1)
    assert labels(base / "test_changes.json") == [f"GET {server.url}/q?v=b"]

    # Replay only, server up: httpx replays while requests stays live in the hybrid test, and
    # a replaying test may not even connect to loopback.
    HITS.clear()
    monkeypatch.setenv("CALLS", "1")
    replay = run(pytester, "--timetracer-record-mode=none", "--timetracer-block-network",
                 "-k", "not outside")
    replay.assert_outcomes(passed=7, failed=1, errors=2)  # test_fewer: passed, then teardown error
    assert HITS == ["/live"]
    out = replay.stdout.str()
    assert f"1 recorded call(s) in {base / 'test_fewer.json'} were not made" in out
    assert f"  - GET {server.url}/fewer/1" in out and "allowed/1" not in out
    assert f"Connect to 127.0.0.1:{server.port} blocked by a replaying test" in out
    assert "ERROR at teardown of test_fewer" in out
    assert "ERROR at setup of test_never_recorded" in out
    assert (f"No cassette at {base / 'test_never_recorded.json'} for test_modes.py::test_never_recorded "
            "and the record mode is 'none'; record it with --timetracer-record-mode=once.") in out

    blocked = run(pytester, "--timetracer-record-mode=all", "--timetracer-block-network", "-k", "outside")
    blocked.assert_outcomes(passed=1, failed=1, errors=1)
    out = blocked.stdout.str()
    assert "NetworkBlockedError: Connect to 192.0.2.1:80 blocked by --timetracer-block-network" in out
    assert "ERROR at teardown of test_outside_swallowed" in out
    assert "connects blocked by --timetracer-block-network: 192.0.2.1:80" in out


def test_calls_left_to_a_writer_in_the_same_process_are_recorded(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test suite that also builds a timetracer processor (its own record() or exporter)
    # turns on deferred capture for the whole process: the plugin must still keep the calls.
    server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    pytester.makeconftest("""
        from timetracer_otel.exporters import CassetteSpanProcessor
        from timetracer_otel.replay_shims.base import STATE

        processor = CassetteSpanProcessor(dir="other-cassettes")  # sets STATE.defer
        assert STATE.defer
    """)
    pytester.makepyfile(test_sample="""
        import os
        import httpx
        import pytest

        @pytest.mark.timetracer
        def test_call():
            body = httpx.get(os.environ["SAMPLE_UPSTREAM"] + "/deferred", params={"q": "1"}).json()
            assert body == {"path": "/deferred", "query": "q=1"}
    """)
    run(pytester, "--timetracer-record-mode=all").assert_outcomes(passed=1)
    [interaction] = cassettes(pytester.path)["test_call.json"].interactions
    assert interaction.library == "httpx" and interaction.response["status"] == 200
    HITS.clear()
    run(pytester, "--timetracer-record-mode=none", "--timetracer-block-network").assert_outcomes(
        passed=1)
    assert HITS == []  # answered from the cassette


def sample_project(pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch,
                   tests: str) -> Any:
    """``test_sample.py`` holding ``tests`` after the imports they all use, with the upstream
    running and its URL in ``SAMPLE_UPSTREAM``; returns the server."""
    server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    pytester.makepyfile(test_sample="import os\nimport httpx\nimport pytest\n\n" + textwrap.dedent(tests))
    return server


def recorded_then_replayed_offline(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                   database: str, **replay_env: str) -> pytest.RunResult:
    """Run the sample project once against PostgreSQL (``SAMPLE_DSN``), recording, then again
    with ``replay_env`` set and the DSN at a dead port; the replay's result."""
    monkeypatch.setenv("SAMPLE_DSN", f"postgresql://postgres@127.0.0.1:5432/{database}")
    run(pytester).assert_outcomes(passed=1)  # recorded
    for name, value in replay_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SAMPLE_DSN", f"postgresql://postgres@127.0.0.1:{unreachable_port()}/{database}")
    return run(pytester)


def test_a_swallowed_query_that_could_not_go_live_fails_the_test(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch, pg_database: str
) -> None:
    """on_miss="passthrough" lets a miss go live, but a psycopg connection the replay opened
    from the cassette has no server when the database is out of reach (the replay points at a
    dead port): the test fails even when its code swallows the error."""
    sample_project(pytester, serve, monkeypatch, """
        import psycopg

        @pytest.mark.timetracer(on_miss="passthrough")
        def test_queries():
            with psycopg.connect(os.environ["SAMPLE_DSN"]) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
                if os.environ.get("MORE"):
                    try:
                        conn.execute("SELECT 2")
                    except Exception:
                        pass  # swallowed
    """)
    replayed = recorded_then_replayed_offline(pytester, monkeypatch, pg_database, MORE="1")
    replayed.assert_outcomes(passed=1, errors=1)  # passed, then failed at teardown
    replayed.stdout.fnmatch_lines(["*1 call(s) had no recording in * and could not go live*",
                                   "*- execute SELECT 2*"])


def test_a_swallowed_call_replay_refuses_fails_the_test(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch, pg_database: str
) -> None:
    """A recorded LISTEN is refused in replay (no notification could ever arrive): the test
    fails even when its code swallows the ReplayUnsupportedError."""
    sample_project(pytester, serve, monkeypatch, """
        import psycopg

        @pytest.mark.timetracer
        def test_listens():
            with psycopg.connect(os.environ["SAMPLE_DSN"], autocommit=True) as conn:
                try:
                    conn.execute("LISTEN tt_plugin_channel")
                except Exception:
                    pass  # swallowed
    """)
    replayed = recorded_then_replayed_offline(pytester, monkeypatch, pg_database)
    replayed.assert_outcomes(passed=1, errors=1)  # passed, then failed at teardown
    replayed.stdout.fnmatch_lines(["*1 call(s) recorded in * were refused in replay*",
                                   "*- *LISTEN*"])


def test_on_miss_record_appends_what_the_cassette_lacks(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The marker's on_miss="record" under the default `once` mode: the replayed call is
    # answered from the cassette, the new one goes live and joins the cassette.
    server = sample_project(pytester, serve, monkeypatch, """
        @pytest.mark.timetracer(on_miss="record")
        def test_calls():
            for n in range(int(os.environ["CALLS"])):
                assert httpx.get(os.environ["SAMPLE_UPSTREAM"] + f"/n/{n}").json()["path"] == f"/n/{n}"
    """)
    monkeypatch.setenv("CALLS", "1")
    run(pytester).assert_outcomes(passed=1)
    path = pytester.path / "cassettes" / "test_sample" / "test_calls.json"
    assert labels(path) == [f"GET {server.url}/n/0"]
    HITS.clear()
    monkeypatch.setenv("CALLS", "2")
    run(pytester).assert_outcomes(passed=1)
    assert HITS == ["/n/1"]  # only the call the cassette lacked went live
    assert labels(path) == [f"GET {server.url}/n/0", f"GET {server.url}/n/1"]
    HITS.clear()
    run(pytester, "--timetracer-record-mode=none", "--timetracer-block-network").assert_outcomes(
        passed=1)
    assert HITS == []
    # `none` replays only, whatever the marker says: the call it lacks fails the test and the
    # cassette stays as it was.
    monkeypatch.setenv("CALLS", "3")
    before = path.read_bytes()
    run(pytester, "--timetracer-record-mode=none").assert_outcomes(failed=1)
    assert HITS == [] and path.read_bytes() == before
    # With a key set, a plaintext cassette that gains a call stays plaintext.
    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", "11" * 32)
    run(pytester).assert_outcomes(passed=1)
    assert HITS == ["/n/2"] and path.read_bytes().startswith(b"{")
    assert labels(path)[-1] == f"GET {server.url}/n/2"


def test_cassettes_that_cannot_be_written_fail_in_one_line(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (pytester.path / "blocker").write_text("a file where a directory should be")
    sample_project(pytester, serve, monkeypatch, """
        def call():
            httpx.get(os.environ["SAMPLE_UPSTREAM"] + "/x")

        @pytest.mark.timetracer("blocker/cassette.json")
        def test_unwritable():
            call()

        @pytest.mark.timetracer("cassette.yaml")
        def test_bad_suffix():
            call()

        @pytest.mark.timetracer(live=["htpx"])
        def test_misspelt_live():
            call()
    """)
    HITS.clear()
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=3)
    out = result.stdout.str()
    assert "ERROR at teardown of test_unwritable" in out
    assert "The cassette of test_sample.py::test_unwritable was not written: " in out
    assert ("@pytest.mark.timetracer(path='cassette.yaml'): a cassette file ends in .json or "
            ".msgpack; rename it.") in out
    assert "@pytest.mark.timetracer(live=...) names 'htpx', which timetracer-otel does not record" in out
    assert HITS == ["/x"]  # the two bad markers stopped their tests before they ran
    assert "Traceback" not in out and "cassette.py:" not in out  # one line each, not a traceback


def test_the_payload_limit_applies_to_test_cassettes(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", "300")
    sample_project(pytester, serve, monkeypatch, """
        @pytest.mark.timetracer
        def test_sizes():
            httpx.get(os.environ["SAMPLE_UPSTREAM"] + "/small")
            httpx.get(os.environ["SAMPLE_UPSTREAM"] + "/large", params={"q": "x" * 400})
    """)
    run(pytester).assert_outcomes(passed=1)
    small, large = cassettes(pytester.path)["test_sizes.json"].interactions
    assert (small.truncated, large.truncated) == (False, True)
    assert large.response is None and small.response is not None


def test_cassettes_named_by_the_earlier_rule_are_still_found(
    pytester: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_project(pytester, serve, monkeypatch, """
        @pytest.mark.timetracer
        @pytest.mark.parametrize("host", ["::1"])
        def test_connect(host):
            httpx.get(os.environ["SAMPLE_UPSTREAM"] + "/c")
    """)
    run(pytester).assert_outcomes(passed=1)
    base = pytester.path / "cassettes" / "test_sample"
    [current] = base.iterdir()
    assert current.name.startswith("test_connect[__1]-")  # "::" in a parameter: the hash suffix
    # A cassette recorded before that rule, under the name it had then, still replays, even
    # when it was recorded from another rootdir (its node id had another module path).
    earlier = base / "test_connect[.1].json"
    cassette = load_cassette(current)
    current.unlink()
    cassette.name = "tests/" + cassette.name
    save_cassette(cassette, earlier)
    HITS.clear()
    run(pytester, "--timetracer-record-mode=none").assert_outcomes(passed=1)
    assert HITS == [] and [p.name for p in base.iterdir()] == [earlier.name]
    # Recorded again, it moves to the current name.
    for mode in ("all", "rewrite"):
        if mode == "rewrite":
            current.rename(earlier)
        HITS.clear()
        run(pytester, f"--timetracer-record-mode={mode}").assert_outcomes(passed=1)
        assert HITS == ["/c"] and [p.name for p in base.iterdir()] == [current.name]
        assert load_cassette(current).name == "test_sample.py::test_connect[::1]"


def test_a_recording_inside_pytester_leaves_the_libraries_usable_by_later_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytester puts sys.modules back after each test, dropping what that test imported
    first, and the first record() of a session imports every shimmed library. The next test
    then gets a second copy of each: asyncpg >= 0.31 segfaults at its first connect
    (MagicStack/asyncpg#1292), and the shims, installed on the first copy, would miss calls
    through the second. Run as this suite runs, with its conftest: both tests pass."""
    monkeypatch.setenv("PYTHONPATH", str(HERE.parent.parent))
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_order="""
        import asyncio

        import timetracer_otel
        from tests.conftest import unreachable_port

        pytest_plugins = ["pytester"]
        DSN = "postgresql://postgres@127.0.0.1:{}/test"


        def test_records_inside_pytester(pytester, tmp_path):
            with timetracer_otel.record(dir=tmp_path):
                pass


        def test_databases_afterwards(tmp_path):
            import asyncpg
            import psycopg

            def job(port):
                with psycopg.connect(DSN.format(port), connect_timeout=3) as conn:
                    out = conn.execute("SELECT 2").fetchall()

                async def one():
                    conn = await asyncpg.connect(DSN.format(port), timeout=3)
                    try:
                        return await conn.fetchval("SELECT 1")
                    finally:
                        await conn.close()

                return [*out, asyncio.run(one())]

            with timetracer_otel.record(dir=tmp_path) as rec:
                assert job(5432) == [(2,), 1]
            with timetracer_otel.replay(rec.paths, strict=True) as rep:
                assert job(unreachable_port()) == [(2,), 1]
            assert rep.report.exact > 0 and not (rep.report.misses or rep.report.unused)
    """)
    result = run(pytester)
    assert result.ret == 0, (result.ret, result.stdout.str()[-3000:], result.stderr.str()[-3000:])
    result.assert_outcomes(passed=2)
