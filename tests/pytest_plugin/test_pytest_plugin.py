"""The pytest plugin, run on a sample project with pytester in a subprocess (the plugin
patches process-wide state, so every run gets a fresh interpreter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from timetracer_otel.cassette import Cassette, load_cassette

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
SAMPLE = HERE / "sample"


async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A real HTTP upstream (served by uvicorn): echoes the path and query as JSON."""
    assert scope["type"] == "http"
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


def test_record_then_replay_offline_then_miss_then_rewrite(
    project: pytest.Pytester, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(upstream)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)

    first = run(project)
    first.assert_outcomes(passed=5)
    recorded = cassettes(project.path)
    assert sorted(recorded) == [
        "TestMore.test_async.json",
        "TestMore.test_requests[1].json",
        "TestMore.test_requests[22].json",
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
    assert [s.library for s in recorded["TestMore.test_requests[22].json"].interactions] == ["requests"]

    server.stop()  # the upstream is gone: the second run can only pass from the cassettes
    second = run(project, "--timetracer-record-mode=none", "--timetracer-block-network")
    second.assert_outcomes(passed=5)
    assert cassettes(project.path).keys() == recorded.keys()
    assert all(c.id == recorded[n].id for n, c in cassettes(project.path).items())  # not rewritten

    monkeypatch.setenv("SAMPLE_KIND", "gadgets")
    third = run(project, "test_sample.py::test_search")
    third.assert_outcomes(failed=1)
    out = third.stdout.str()
    assert f"No recorded httpx call matches GET {server.url}/search/gadgets?q=blue" in out
    assert f"GET {server.url}/search/widgets?q=blue (unused)" in out
    assert "--timetracer-record-mode=rewrite 'test_sample.py::test_search'" in out

    server = serve(upstream, port=server.port)
    fourth = run(project, "--timetracer-record-mode=rewrite")
    fourth.assert_outcomes(passed=5)
    rewritten = cassettes(project.path)
    assert rewritten["test_search.json"].id != search.id
    assert [s.label for s in rewritten["test_search.json"].interactions][1] == (
        f"GET {server.url}/search/gadgets?q=blue"
    )
