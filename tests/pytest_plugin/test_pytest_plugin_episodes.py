"""The pytest plugin keeps each test's cassette to itself: secrets learned in one test do not
change how another is redacted and keyed, and in new_episodes a write that went live is not
followed by reads of the same service answered from before it. Run on sample projects with
pytester in a subprocess, against real uvicorn upstreams."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from timetracer_otel.cassette import SpanRecord, load_cassette
from timetracer_otel.codec import as_bytes

pytest_plugins = ["pytester"]

QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:faker",
         "-p", "no:benchmark", "-p", "no:xdist.looponfail")


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess(*QUIET, *args)


class Upstream:
    """A real HTTP service (served by uvicorn) with state: ``POST /items`` adds an item,
    ``GET /items`` lists them; any other path echoes itself. ``hits`` lists what reached it."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.hits: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, path = scope["method"], scope["path"]
        self.hits.append(f"{method} {path}")
        if path == "/items" and method == "POST":
            self.items.append(json.loads(body)["name"])
        answer: Any = {"items": self.items} if path == "/items" else {"path": path, "body": body.decode()}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


def project(pytester: pytest.Pytester, tests: str, conftest: str = "") -> None:
    pytester.makeini("[pytest]\n")
    if conftest:
        pytester.makeconftest(textwrap.dedent(conftest))
    pytester.makepyfile(test_sample="import os\nimport httpx\nimport pytest\n\n"
                        "UP = os.environ['SAMPLE_UPSTREAM']\n" + textwrap.dedent(tests))


def interactions(root: Path, test: str) -> list[SpanRecord]:
    return load_cassette(root / "cassettes" / "test_sample" / f"{test}.json").interactions


def sent_body(span: SpanRecord) -> str:
    assert isinstance(span.request, dict)
    return as_bytes(span.request["body"]).decode()


# --- learned secrets stay in the test that learned them ------------------------------------

TOKEN = "s3cr3t-bearer-0123456789abcdef"

LOGIN_TEST = f"""
    TOKEN = {TOKEN!r}

    @pytest.mark.timetracer
    def test_a_login():
        # Teaches the redactor TOKEN (an Authorization header is a secret by name).
        httpx.get(UP + "/me", headers={{"Authorization": f"Bearer {{TOKEN}}"}})
"""

SECRET_TESTS = LOGIN_TEST + """
    @pytest.mark.timetracer
    def test_b_note():
        # The same value where no rule names it a secret: kept or scrubbed only by what this
        # test itself taught the redactor, whichever tests ran before it.
        assert httpx.post(UP + "/notes", json={"note": TOKEN}).json()["path"] == "/notes"

    @pytest.mark.timetracer
    def test_c_login_then_note():
        httpx.get(UP + "/me", headers={"Authorization": f"Bearer {TOKEN}"})
        httpx.post(UP + "/notes", json={"note": TOKEN})

    @pytest.mark.timetracer
    def test_d_pin():
        httpx.post(UP + "/pins", json={"pin": "4321-5678"})
"""

# A rule the project configures in code: it holds for every test, whatever the resets.
SECRET_CONFTEST = """
    import timetracer_otel.redaction

    timetracer_otel.redaction.configure(json_paths=["**.pin"])
"""


def test_a_secret_learned_in_one_test_is_not_known_in_the_next(
    pytester: pytest.Pytester, serve: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Upstream()
    server = serve(up)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    project(pytester, SECRET_TESTS, SECRET_CONFTEST)

    run(pytester, "-k", "test_b").assert_outcomes(passed=1)  # alone
    [alone] = interactions(pytester.path, "test_b_note")
    assert TOKEN in sent_body(alone)  # no rule names it, and the test never learned it
    run(pytester, "--timetracer-record-mode=all").assert_outcomes(passed=4)  # after test_a
    [note] = interactions(pytester.path, "test_b_note")
    # The same key either way (test_a's secret did not change how test_b's call is keyed),
    # but what is stored no longer holds the secret test_a learned.
    assert note.key == alone.key
    assert TOKEN not in sent_body(note) and "redacted:" in sent_body(note)
    # A secret the test learned itself is still scrubbed from its later calls, and the
    # configured rule still applies.
    _, c_note = interactions(pytester.path, "test_c_login_then_note")
    assert TOKEN not in sent_body(c_note) and "redacted:" in sent_body(c_note)
    [pin] = interactions(pytester.path, "test_d_pin")
    assert "4321-5678" not in sent_body(pin) and "redacted:" in sent_body(pin)

    # Recorded in the full run, replayed alone and in the full run, with the service gone.
    server.stop()
    run(pytester, "--timetracer-record-mode=none", "-k", "test_b").assert_outcomes(passed=1)
    run(pytester, "--timetracer-record-mode=none").assert_outcomes(passed=4)


def test_a_secret_learned_outside_every_cassette_test_is_not_known_in_them(
    pytester: pytest.Pytester, serve: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An ordinary test (no cassette) that teaches the project's redactor a secret before the
    # first cassette test runs, as one recording by hand would: the cassette test after it
    # stores its request as it does alone.
    server = serve(Upstream())
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    project(pytester, f"""
    def test_0_plain():
        from timetracer_otel.replay_shims.base import STATE
        STATE.redactor.token({TOKEN!r})
    """ + SECRET_TESTS)
    run(pytester, "-k", "test_b").assert_outcomes(passed=1)
    [alone] = interactions(pytester.path, "test_b_note")
    run(pytester, "--timetracer-record-mode=all", "-k", "test_0 or test_b").assert_outcomes(passed=2)
    [note] = interactions(pytester.path, "test_b_note")
    assert note.key == alone.key and TOKEN in sent_body(alone)
    assert TOKEN not in sent_body(note)  # known to the process: not stored
    server.stop()  # and it replays, keyed as recorded
    run(pytester, "--timetracer-record-mode=none", "-k", "test_b").assert_outcomes(passed=1)


def test_a_test_recorded_alone_replays_after_the_test_that_learns_its_secret(
    pytester: pytest.Pytester, serve: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Upstream()
    server = serve(up)
    monkeypatch.setenv("SAMPLE_UPSTREAM", server.url)
    project(pytester, SECRET_TESTS)
    run(pytester, "-k", "test_a or test_b").assert_outcomes(passed=2)
    for name in ("test_a_login", "test_b_note"):  # as if each had been recorded alone
        (pytester.path / "cassettes" / "test_sample" / f"{name}.json").unlink()
        run(pytester, "-k", name).assert_outcomes(passed=1)
    before = (pytester.path / "cassettes" / "test_sample" / "test_b_note.json").read_bytes()
    up.hits.clear()
    # new_episodes learns test_a's secret while it replays its request; test_b, replayed
    # after it, still finds its recorded call (it would otherwise go live as a new episode).
    run(pytester, "--timetracer-record-mode=new_episodes", "-k", "test_a or test_b").assert_outcomes(
        passed=2)
    assert up.hits == []
    assert (pytester.path / "cassettes" / "test_sample" / "test_b_note.json").read_bytes() == before


# --- new_episodes: what a new write makes stale goes live ----------------------------------

EPISODE_TESTS = """
    OTHER = os.environ["OTHER_UPSTREAM"]

    @pytest.mark.timetracer
    def test_write_then_read(timetracer):
        name = os.environ.get("NAME", "a")
        httpx.get(OTHER + "/before")
        httpx.post(UP + "/items", json={"name": name})
        # The list reflects the write that was just made, also when the write is new.
        assert name in httpx.get(UP + "/items").json()["items"]
        httpx.get(OTHER + "/after")  # another service: answered from the cassette

    @pytest.mark.timetracer
    def test_changed_read_then_read():
        httpx.get(UP + "/q", params={"v": os.environ.get("V", "a")})
        httpx.get(UP + "/stable")  # a read changes nothing: still answered from the cassette
"""


def test_new_episodes_reads_after_a_new_write_to_the_same_service_go_live(
    pytester: pytest.Pytester, serve: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    up, other = Upstream(), Upstream()
    up_server, other_server = serve(up), serve(other)
    monkeypatch.setenv("SAMPLE_UPSTREAM", up_server.url)
    monkeypatch.setenv("OTHER_UPSTREAM", other_server.url)
    project(pytester, EPISODE_TESTS)
    run(pytester).assert_outcomes(passed=2)
    assert up.items == ["a"]
    recorded = interactions(pytester.path, "test_write_then_read")
    assert [s.label for s in recorded][1:3] == [f"POST {up_server.url}/items", f"GET {up_server.url}/items"]

    # The write changed: it goes live, and so does the read of the same service after it.
    up.hits.clear()
    other.hits.clear()
    monkeypatch.setenv("NAME", "b")
    monkeypatch.setenv("V", "b")
    result = run(pytester, "--timetracer-record-mode=new_episodes")
    result.assert_outcomes(passed=2)
    assert up.hits == ["POST /items", "GET /items", "GET /q"]  # /stable was replayed
    assert other.hits == []
    assert up.items == ["a", "b"]
    spans = interactions(pytester.path, "test_write_then_read")
    assert [s.label for s in spans] == [
        f"GET {other_server.url}/before", f"GET {other_server.url}/after",
        f"POST {up_server.url}/items", f"GET {up_server.url}/items",
    ]  # the replaced write and the stale read are gone; the live ones were added
    assert '"b"' in sent_body(spans[2])
    assert isinstance(spans[3].response, dict)

    # The cassette replays as it was recorded now, with both services gone.
    up_server.stop()
    other_server.stop()
    run(pytester, "--timetracer-record-mode=none", "--timetracer-block-network").assert_outcomes(
        passed=2)


def test_which_calls_may_write_and_where_their_state_lives() -> None:
    from timetracer_otel.keys import Call, http_call
    from timetracer_otel.pytest_plugin import _backend, _may_write
    from timetracer_otel.sql import sql_call

    get = http_call("httpx", "GET", "http://127.0.0.1:81/items?a=1", [], b"")
    post = http_call("requests", "post", "http://127.0.0.1:81/items", [], b"{}")
    assert _backend(get) == _backend(post) == ("http", "http", "127.0.0.1:81")  # either client
    assert _backend(http_call("httpx", "GET", "http://127.0.0.1:82/", [], b"")) != _backend(get)
    assert (_may_write(get), _may_write(post)) == (False, True)
    select = sql_call("asyncpg", "  select id FROM items", database="app")
    insert = sql_call("psycopg", "INSERT INTO items VALUES ($1)", (1,), database="app")
    connect = sql_call("psycopg", "connect", None, database="app", operation="connect",
                       extra={"user": "u"})
    assert _backend(select) == _backend(insert) == _backend(connect) == ("sql", "app")
    assert (_may_write(select), _may_write(insert), _may_write(connect)) == (False, True, False)
    redis = Call("redis", {}, {"db": 13, "command": ["GET", "k"]}, {}, "GET k")
    assert _backend(redis) == ("redis", "db", "13") and _may_write(redis)  # unknown: may write


def test_a_new_episode_stores_no_secret_an_earlier_test_learned(
    pytester: pytest.Pytester, serve: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call new_episodes adds to a cassette is scrubbed as a whole cassette is: of every
    # secret the process knows (here the token test_a's replayed request taught it).
    monkeypatch.setenv("SAMPLE_UPSTREAM", serve(Upstream()).url)
    project(pytester, LOGIN_TEST + """
    @pytest.mark.timetracer
    def test_b_note():
        httpx.get(UP + "/base")
        if os.environ.get("MORE"):
            httpx.post(UP + "/notes", json={"note": TOKEN})
    """)
    run(pytester, "--timetracer-record-mode=all").assert_outcomes(passed=2)
    monkeypatch.setenv("MORE", "1")
    run(pytester, "--timetracer-record-mode=new_episodes").assert_outcomes(passed=2)
    _, note = interactions(pytester.path, "test_b_note")
    assert note.label.startswith("POST") and "redacted:" in sent_body(note)
    assert TOKEN not in sent_body(note)
