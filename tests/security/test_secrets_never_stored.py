"""Done-when: secrets in every place a request carries them never reach a cassette's bytes, while
the app sees the originals and replay still matches (httpx and requests, real uvicorn upstream)."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import timetracer_otel
from tests.conftest import SHARED_SERVICES
from timetracer_otel import redaction
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayMissError
from timetracer_otel.replay_shims.base import STATE

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

SECRETS = {
    "bearer": "BearerSecret-4f1c2a",
    "cookie": "CookieSecret-81be0d",
    "apikey_header": "ApiKeySecret-0c9d77",
    "session_header": "SessionHdrSecret-66a1",
    "query_key": "QueryKeySecret-2b7e11",
    "query_custom": "QuerySidSecret-93f0aa",
    "dsn_password": "DsnPassSecret-5d3e",
    "body_password": "BodyPassSecret-7a2f",
    "body_card": "CardNumberSecret-1e8b",
    "response_token": "RespTokenSecret-c4d2",
    "response_cookie": "SetCookieSecret-0f6e",
}
RULES = "header:x-session-*,query:sid,json:card.number,json:session.token,json:**.ssn"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


async def login(request: Request) -> JSONResponse:
    body = await request.json()
    # The upstream answers with hashes of what it received: proof the originals went out,
    # without the answer itself carrying the secrets.
    seen = {
        "authorization": _digest(request.headers.get("authorization", "")),
        "cookie": _digest(request.cookies.get("session", "")),
        "x_api_key_digest": _digest(request.headers.get("x-api-key", "")),
        "session": _digest(request.headers.get("x-session-id", "")),
        "query_key": _digest(request.query_params.get("api_key", "")),
        "query_sid": _digest(request.query_params.get("sid", "")),
        "body_pw_digest": _digest(body["user"]["password"]),
        "card": _digest(body["card"]["number"]),
    }
    response = JSONResponse(
        {"seen": seen, "session": {"token": SECRETS["response_token"]}, "message": "hello",
         "age": 41}
    )
    response.set_cookie("sid", SECRETS["response_cookie"], path="/")
    return response


_last_auth: dict[str, str] = {}


async def whoami(request: Request) -> JSONResponse:
    # Remembers the caller's credentials and echoes them on /last: an upstream that hands a
    # secret back in a call that does not carry it (a debug or session endpoint).
    _last_auth["authorization"] = request.headers.get("authorization", "")
    return JSONResponse({"ok": True})


async def last(request: Request) -> JSONResponse:
    return JSONResponse({"authorization": _last_auth.get("authorization", "")})


app = Starlette(routes=[Route("/login", login, methods=["POST"]), Route("/whoami", whoami),
                        Route("/last", last)])


def expected_seen(dsn_auth: str) -> dict[str, str]:
    return {
        "authorization": _digest(dsn_auth),
        "cookie": _digest(SECRETS["cookie"]),
        "x_api_key_digest": _digest(SECRETS["apikey_header"]),
        "session": _digest(SECRETS["session_header"]),
        "query_key": _digest(SECRETS["query_key"]),
        "query_sid": _digest(SECRETS["query_custom"]),
        "body_pw_digest": _digest(SECRETS["body_password"]),
        "card": _digest(SECRETS["body_card"]),
    }


@pytest.fixture
def rules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original = STATE.redactor
    monkeypatch.setenv("TIMETRACER_REDACT", RULES)
    monkeypatch.delenv("TIMETRACER_REDACTION_KEY", raising=False)
    redaction.set_default_redactor(redaction.Redactor())
    yield
    redaction.set_default_redactor(original)


def _payload() -> dict[str, Any]:
    return {"user": {"name": "ann", "password": SECRETS["body_password"]},
            "card": {"number": SECRETS["body_card"], "brand": "visa"}, "message": "age check"}


def call_httpx(base: str) -> dict[str, Any]:
    userinfo_base = base.replace("http://", f"http://svc:{SECRETS['dsn_password']}@")
    with httpx.Client(cookies={"session": SECRETS["cookie"]}) as c:
        r = c.post(
            f"{userinfo_base}/login",
            params={"api_key": SECRETS["query_key"], "sid": SECRETS["query_custom"], "page": "1"},
            headers={"X-API-Key": SECRETS["apikey_header"], "X-Session-Id": SECRETS["session_header"]},
            json=_payload(),
        )
    return {"json": r.json(), "cookie": r.cookies.get("sid"), "type": type(r)}


def call_requests(base: str) -> dict[str, Any]:
    with requests.Session() as s:
        s.cookies.set("session", SECRETS["cookie"])
        r = s.post(
            f"{base}/login",
            params={"api_key": SECRETS["query_key"], "sid": SECRETS["query_custom"], "page": "1"},
            headers={"Authorization": f"Bearer {SECRETS['bearer']}", "X-API-Key": SECRETS["apikey_header"],
                     "X-Session-Id": SECRETS["session_header"]},
            json=_payload(),
        )
    return {"json": r.json(), "cookie": r.cookies.get("sid"), "type": type(r)}


def _leaves(node: Any) -> Iterator[bytes]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k).encode()
            yield from _leaves(v)
    elif isinstance(node, list):
        for x in node:
            yield from _leaves(x)
    elif isinstance(node, bytes):
        yield node
    elif isinstance(node, str):
        yield node.encode()
        with contextlib.suppress(ValueError):  # JSON cassettes carry bytes as base64 text
            yield base64.b64decode(node, validate=True)


def assert_no_secret(path: Path) -> None:
    """Every byte of the file, every decoded leaf (base64, gzip) and their base64 forms."""
    raw = path.read_bytes()
    import msgspec

    tree = msgspec.json.decode(raw) if raw[:1] == b"{" else msgspec.msgpack.decode(raw)
    blobs = [raw, *_leaves(tree)]
    blobs += [gzip.decompress(b) for b in blobs if b[:2] == b"\x1f\x8b"]
    for name, secret in SECRETS.items():
        forms = {secret.encode(), base64.b64encode(secret.encode()),
                 base64.b64encode(f"svc:{secret}".encode())}
        for blob in blobs:
            for form in forms:
                assert form not in blob, f"secret {name} found in {path.name}"


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_secrets_never_reach_the_cassette_and_replay_still_matches(
    serve: Any, tmp_path: Path, rules: None, fmt: str, client: str
) -> None:
    server = serve(app)
    job = call_httpx if client == "httpx" else call_requests
    dsn_auth = (
        "Basic " + base64.b64encode(f"svc:{SECRETS['dsn_password']}".encode()).decode()
        if client == "httpx" else f"Bearer {SECRETS['bearer']}"
    )
    with timetracer_otel.record(dir=tmp_path, format=fmt) as rec:  # type: ignore[arg-type]
        live = job(server.url)
    server.stop()

    # The app saw the originals: the upstream got every secret, the app got its answer.
    assert live["json"]["seen"] == expected_seen(dsn_auth)
    assert live["json"]["session"]["token"] == SECRETS["response_token"]
    assert live["cookie"] == SECRETS["response_cookie"]
    assert live["type"] is (httpx.Response if client == "httpx" else requests.Response)

    assert len(rec.paths) == 1
    path = Path(rec.paths[0])
    assert_no_secret(path)
    span = next(s for s in load_cassette(path).interactions if s.library == client)
    stored_headers = {k.lower(): v for k, v in span.request["headers"]}
    assert stored_headers["x-api-key"].startswith("redacted:")
    assert stored_headers["cookie"].startswith("session=redacted:")  # cookie names are kept

    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(server.url)
    assert rep.report.exact == 1 and not rep.report.misses  # strict: exact key, tokens folded
    # Upstream's own hashes and plain fields come back unchanged; "message" and "age" are not
    # touched by rules naming other fields (exact names, never substrings).
    assert replayed["json"]["seen"] == live["json"]["seen"]
    assert replayed["json"]["message"] == "hello" and replayed["json"]["age"] == 41
    assert type(replayed["json"]["age"]) is int
    # What was redacted in a response comes back as its token on replay (documented).
    token = replayed["json"]["session"]["token"]
    assert isinstance(token, str) and token.startswith("redacted:")
    assert replayed["cookie"] is not None and replayed["cookie"].startswith("redacted:")


def test_a_replay_miss_prints_tokens_never_the_secret(serve: Any, tmp_path: Path, rules: None) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        call_requests(server.url)
    server.stop()
    params = {"api_key": SECRETS["query_key"], "sid": SECRETS["query_custom"]}
    with (timetracer_otel.replay(rec.paths, strict=True), pytest.raises(ReplayMissError) as info,
          requests.Session() as s):
        # Same secrets, another path: a miss whose diff lists the recorded candidate.
        s.post(f"{server.url}/logout", params=params,
               headers={"Authorization": f"Bearer {SECRETS['bearer']}"},
               json={"user": {"password": SECRETS["body_password"]}, "card": {"number": "other"}})
    message = str(info.value)
    assert "/logout" in message and "redacted:" in message
    for name, secret in SECRETS.items():
        assert secret not in message, f"secret {name} printed in the miss message"
    assert json.dumps(SECRETS["query_key"]) not in message

    from click.testing import CliRunner

    from timetracer_otel.cli import main

    for args in (["show", rec.paths[0]], ["show", "--json", rec.paths[0]],
                 ["html", rec.paths[0], "-o", str(tmp_path / "p.html")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        shown = result.output + ((tmp_path / "p.html").read_text() if args[0] == "html" else "")
        for name, secret in SECRETS.items():
            assert secret not in shown, f"secret {name} printed by {args[0]}"


def test_on_miss_record_scrubs_secrets_of_calls_answered_from_the_cassette(
    serve: Any, tmp_path: Path, rules: None
) -> None:
    # A replay with on_miss="record" answers /whoami from the cassette (its Authorization
    # header never goes out), then records /last live, whose answer quotes that header. The
    # replaying process has its own redactor, which must have learned the secret from the
    # replayed call's request before it keeps the live answer.
    server = serve(app)
    auth = {"Authorization": f"Bearer {SECRETS['bearer']}"}
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/whoami", headers=auth)
    redaction.set_default_redactor(redaction.Redactor())  # a new process knows no secret yet
    with timetracer_otel.replay(rec.paths, on_miss="record", strict=True) as rep:
        httpx.get(f"{server.url}/whoami", headers=auth)
        echoed = httpx.get(f"{server.url}/last").json()["authorization"]
    assert echoed == f"Bearer {SECRETS['bearer']}"  # the app got the real answer
    assert rep.report.exact == 1
    assert [s.label for s in rep.appended] == [f"GET {server.url}/last"]
    import msgspec

    kept = msgspec.msgpack.encode(rep.appended)
    assert b"redacted:" in kept
    assert SECRETS["bearer"].encode() not in kept


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"you_sent": (await request.body()).decode()})


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_a_password_without_digits_is_scrubbed_where_an_upstream_echoes_it(
    serve: Any, tmp_path: Path, client: str
) -> None:
    # Letters only, under 20 characters: a value from a password field is a secret for
    # certain, so it is scrubbed from the echoing answer too (it used to need digits as well,
    # like a cookie value that might be "darkmode").
    secret = "Correcthorsebattery"
    server = serve(Starlette(routes=[Route("/echo", echo, methods=["POST"])]))
    with timetracer_otel.record(dir=tmp_path) as rec:
        if client == "httpx":
            answer = httpx.post(f"{server.url}/echo", json={"password": secret}).json()
        else:
            answer = requests.post(f"{server.url}/echo", json={"password": secret}, timeout=10).json()
    assert secret in answer["you_sent"]  # the app got the real echo
    [path] = rec.paths
    assert secret.encode() not in Path(path).read_bytes()
    [call] = load_cassette(path).interactions
    parts = call.response["chunks"] if client == "httpx" else [call.response["body"]]
    stored = b"".join(base64.b64decode(c) if isinstance(c, str) else c for c in parts)
    assert b"redacted:" in stored and secret.encode() not in stored


def replayed_as_a_new_process(paths: list[str], job: Any, *args: Any) -> tuple[Any, Any]:
    """``job(*args)`` replayed strictly as another process runs it: its own redaction key,
    no secret learned yet. Returns what it returned and the replay's report."""
    original = STATE.redactor
    redaction.set_default_redactor(redaction.Redactor(env={}))
    try:
        with timetracer_otel.replay(paths, strict=True) as rep:
            return job(*args), rep.report
    finally:
        redaction.set_default_redactor(original)


def test_a_secret_the_app_stores_in_its_database_and_cache_is_redacted_there_too(
    serve: Any, tmp_path: Path
) -> None:
    """A bearer token the app sent upstream, then kept as a SQL parameter (psycopg, asyncpg)
    and a Redis value (real PostgreSQL and Redis): its token in the stored commands, as in
    the replies, and the replay still matches exactly."""
    import asyncio

    import asyncpg
    import psycopg
    import redis

    from tests.conftest import unreachable_port

    secret = "StoredBearer-5e1d0c9a"
    dsn = "postgresql://postgres@127.0.0.1:{port}/test"

    def job(base: str, pg: int, cache: int) -> list[Any]:
        httpx.get(f"{base}/whoami", headers={"Authorization": f"Bearer {secret}"})
        with psycopg.connect(dsn.format(port=pg), connect_timeout=3) as conn:
            out: list[Any] = conn.execute("SELECT %s::text", (f"session {secret}",)).fetchall()

        async def pooled() -> Any:
            conn = await asyncpg.connect(dsn.format(port=pg), timeout=3)
            try:
                return await conn.fetchval("SELECT $1::text", f"session {secret}")
            finally:
                await conn.close()

        out.append(asyncio.run(pooled()))
        r = redis.Redis(port=cache, db=11, socket_connect_timeout=3)
        out += [r.set("tt:stored-secret", f"session {secret}"), r.delete("tt:stored-secret")]
        # A binary value (not UTF-8): the secret masked in place, the pickle still loads.
        r.set("tt:stored-blob", pickle.dumps({"token": secret}))
        out.append(pickle.loads(r.get("tt:stored-blob")))
        r.delete("tt:stored-blob")
        r.close()
        return out

    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(server.url, 5432, 6379)
    assert live == [(f"session {secret}",), f"session {secret}", True, 1, {"token": secret}]
    raw = b"".join(Path(p).read_bytes() for p in rec.paths)
    assert secret.encode() not in raw and b"redacted:" in raw
    server.stop()
    down = unreachable_port()
    # (it learns the bearer token from the replayed HTTP call's header)
    replayed, report = replayed_as_a_new_process(rec.paths, job, server.url, down, down)
    assert report.exact > 0 and not (report.misses or report.unused)
    # (the rows come back as recorded: the secret's token in place of the secret)
    assert replayed[2:4] == [True, 1] and replayed[1].startswith("session redacted:")
    masked = replayed[4]["token"]  # masked in place, to the secret's length
    assert masked == "redacted:" + "*" * (len(secret) - 9)


def test_calls_that_differ_only_in_a_secret_are_told_apart_with_a_shared_key(
    serve: Any, tmp_path: Path
) -> None:
    """Keys fold redaction tokens, so GET ?token=A and GET ?token=B share a key. With a
    shared TIMETRACER_REDACTION_KEY their tokens are the same in the replay's process, which
    then answers each with its own response whatever the order; with a key per process the
    tokens differ, and the key's interactions answer in recorded order."""
    from tests.upstream_app import app as counting  # /items answers a count of its calls
    from timetracer_otel.redaction import Redactor, set_default_redactor

    original = STATE.redactor
    server = serve(counting)

    def ask(tokens: tuple[str, ...]) -> list[Any]:
        return [httpx.get(f"{server.url}/items", params={"token": t}).json()["n"] for t in tokens]

    alpha, beta = "TokenAlpha-1234567", "TokenBeta-89012345"
    try:
        set_default_redactor(Redactor(env={"TIMETRACER_REDACTION_KEY": "shared-key-1"}))
        with timetracer_otel.record(dir=tmp_path) as rec:
            live = ask((alpha, beta))
        server.stop()
        answers = {}
        for shared in (True, False):  # a new process's redactor: the same key, or its own
            env = {"TIMETRACER_REDACTION_KEY": "shared-key-1"} if shared else {}
            set_default_redactor(Redactor(env=env))
            with timetracer_otel.replay(rec.paths, strict=True) as rep:
                answers[shared] = ask((beta, alpha))
            assert rep.report.exact == 2 and not rep.report.misses
    finally:
        set_default_redactor(original)
    assert live[1] == live[0] + 1
    assert answers[True] == [live[1], live[0]]  # each its own answer
    assert answers[False] == live  # in recorded order


def test_many_calls_that_differ_only_in_a_secret_each_get_their_own_answer(
    serve: Any, tmp_path: Path
) -> None:
    """Seventy calls of one key with seventy tokens, replayed with the first one last: every
    call still gets the answer recorded with its own token (a bounded search of the key's
    interactions once ran out and handed later calls another token's answer as exact)."""
    from tests.upstream_app import app as counting
    from timetracer_otel.redaction import Redactor, set_default_redactor

    original = STATE.redactor
    server = serve(counting)
    tokens = [f"Token{i:02d}-abcdefgh1234" for i in range(70)]

    def ask(order: list[str]) -> dict[str, int]:
        with httpx.Client() as client:
            return {t: client.get(f"{server.url}/items", params={"token": t}).json()["n"]
                    for t in order}

    try:
        set_default_redactor(Redactor(env={"TIMETRACER_REDACTION_KEY": "shared-key-2"}))
        with timetracer_otel.record(dir=tmp_path) as rec:
            live = ask(tokens)
        server.stop()
        set_default_redactor(Redactor(env={"TIMETRACER_REDACTION_KEY": "shared-key-2"}))
        with timetracer_otel.replay(rec.paths, strict=True) as rep:
            replayed = ask(tokens[1:] + tokens[:1])
    finally:
        set_default_redactor(original)
    assert rep.report.exact == 70
    assert replayed == live


def test_a_secret_the_app_stores_before_it_sends_it_is_redacted_too(
    serve: Any, tmp_path: Path
) -> None:
    """The other order: the token is stored first (a Redis SET, a psycopg parameter) and only
    then sent as a header. The cassette is written after the run, when the secret is known:
    no byte of it there either, and a replay in a new process (which meets the stored value
    before it learns the secret, as the recording did) still matches every call strictly."""
    import psycopg
    import redis

    from tests.conftest import unreachable_port

    secret = "StoredFirst-7c2b9e41"
    dsn = "postgresql://postgres@127.0.0.1:{port}/test"

    def job(base: str, pg: int, cache: int) -> list[Any]:
        r = redis.Redis(port=cache, db=11, socket_connect_timeout=3)
        out: list[Any] = [r.set("tt:stored-first", f"session {secret}"),
                          r.get("tt:stored-first"), r.delete("tt:stored-first")]
        r.close()
        with psycopg.connect(dsn.format(port=pg), connect_timeout=3) as conn:
            out += conn.execute("SELECT %s::text", (f"session {secret}",)).fetchall()
        out.append(httpx.get(f"{base}/whoami", headers={"Authorization": f"Bearer {secret}"}).status_code)
        return out

    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(server.url, 5432, 6379)
    assert live == [True, f"session {secret}".encode(), 1, (f"session {secret}",), 200]
    raw = b"".join(Path(p).read_bytes() for p in rec.paths)
    assert secret.encode() not in raw and b"redacted:" in raw
    server.stop()
    down = unreachable_port()
    replayed, report = replayed_as_a_new_process(rec.paths, job, server.url, down, down)
    # (redis 3, psycopg connect, its SELECT and the COMMIT the block ends with, httpx 1)
    assert report.exact == 7 and not (report.misses or report.unused)
    assert replayed[0] is True and replayed[4] == 200
