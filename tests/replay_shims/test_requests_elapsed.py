"""requests' ``Response.elapsed`` and Content-Length body reads under timetracer: what the
app sees with timetracer off, recording and replaying, against real local servers (CacheControl,
digest auth, an adapter that retries, redirects, threads, memory, older cassettes, diff).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from urllib3.util.retry import Retry

import timetracer_otel
from tests.conftest import connects_refused
from tests.replay_shims.requests_helpers import close_listener, raw_server, three_ways

pytestmark = pytest.mark.timeout(120)

HITS: dict[str, int] = {}


def _hit(name: str) -> int:
    HITS[name] = HITS.get(name, 0) + 1
    return HITS[name]


async def _cached(request: Request) -> Response:
    _hit("cached")
    return PlainTextResponse("cacheable body " * 10, headers={"cache-control": "max-age=600"})


async def _late(request: Request) -> Response:
    await asyncio.sleep(0.2)
    return PlainTextResponse("late")


async def _flaky(request: Request) -> Response:
    # 503 on odd hits, 200 on even ones: one retry makes a 200
    if _hit("flaky") % 2:
        await asyncio.sleep(0.1)
        return PlainTextResponse("busy", status_code=503)
    return PlainTextResponse("ok")


async def _digest(request: Request) -> Response:
    if request.headers.get("authorization", "").startswith("Digest "):
        return PlainTextResponse("welcome")
    return PlainTextResponse("who?", status_code=401, headers={
        "www-authenticate": 'Digest realm="r", nonce="abc", qop="auth", algorithm=MD5'})


async def _slowbody(request: Request) -> StreamingResponse:
    async def gen() -> Any:
        yield b"head "
        await asyncio.sleep(0.4)  # after the headers: not in requests' elapsed
        yield b"tail"

    return StreamingResponse(gen(), media_type="text/plain", headers={"content-length": "9"})


async def _hop(request: Request) -> RedirectResponse:
    return RedirectResponse("/late", status_code=302)


GZ = __import__("gzip").compress(b'{"z": "' + b"zz" * 5000 + b'"}', mtime=0)


async def _gz(request: Request) -> Response:
    return Response(GZ, headers={"content-encoding": "gzip"}, media_type="application/json")


APP = Starlette(routes=[Route("/gz", _gz), Route("/cached", _cached), Route("/late", _late),
                        Route("/flaky", _flaky), Route("/digest", _digest),
                        Route("/slowbody", _slowbody), Route("/hop", _hop)])


# --- a response is freed ---------------------------------------------------


def test_a_response_is_freed_when_the_app_drops_it(serve: Any, tmp_path: Path) -> None:
    """Off, a Response dies with its last reference: recording and replaying must not hold it
    in a reference cycle (its content and raw body alive until the cyclic GC runs)."""
    server = serve(APP)

    def job() -> bool:
        r = requests.get(f"{server.url}/late")
        ref = weakref.ref(r)
        del r
        return ref() is not None  # still alive without a gc pass?

    gc.disable()
    try:
        plain, recorded, replayed, _ = three_ways(job, tmp_path, server.stop)
    finally:
        gc.enable()
    assert plain is False
    assert (recorded, replayed) == (False, False)


# --- CacheControl caches under record as it does off ------------------------


def test_cachecontrol_caches_as_it_does_off(serve: Any, tmp_path: Path) -> None:
    """cachecontrol's adapter wraps ``raw._fp`` in a CallbackFileWrapper that caches the body
    when ``read`` reaches its end. ``read1`` goes around its ``read`` (``__getattr__``): the
    body is never cached while recording, so every request goes upstream."""
    import cachecontrol
    server = serve(APP)

    def job() -> list[Any]:
        HITS["cached"] = 0
        s = cachecontrol.CacheControl(requests.Session())
        bodies = [s.get(f"{server.url}/cached").text for _ in range(3)]
        return [HITS["cached"], len(set(bodies))]

    plain = job()
    with timetracer_otel.record(dir=tmp_path):
        recorded = job()
    assert plain == [1, 1]
    assert recorded == plain


# --- elapsed of a response that an auth hook re-sent through the adapter -------------------


def test_digest_auth_response_as_off(serve: Any, tmp_path: Path) -> None:
    """HTTPDigestAuth (also requests_ntlm, requests_kerberos) re-sends from its response hook
    with ``r.connection.send``: no Session.send, so no dispatch of timetracer's one-off hook."""
    server = serve(APP)

    def job() -> list[Any]:
        with requests.Session() as s:
            r = s.get(f"{server.url}/digest", auth=requests.auth.HTTPDigestAuth("u", "p"))
            return [r.status_code, r.text, [h.status_code for h in r.history],
                    r.elapsed == timedelta(0),
                    [getattr(h, "__qualname__", repr(h)) for h in r.request.hooks["response"]]]

    plain, recorded, replayed, _ = three_ways(job, tmp_path, server.stop)
    assert plain[:4] == [200, "welcome", [401], True]
    assert recorded == plain
    assert replayed == plain


# --- an adapter subclass whose send does more than one HTTPAdapter.send --------------------


class RetryOn503(HTTPAdapter):
    """An app's adapter: one more try after a 503 (as many in-house adapters do)."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        r = super().send(request, **kwargs)
        if r.status_code == 503:
            r.close()
            time.sleep(0.3)
            r = super().send(request, **kwargs)
        return r


def test_elapsed_of_an_adapter_subclass_as_off(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        HITS["flaky"] = 0
        with requests.Session() as s:
            s.mount("http://", RetryOn503())
            r = s.get(f"{server.url}/flaky")
            return [r.status_code, r.elapsed >= timedelta(seconds=0.4), r.elapsed]

    plain, recorded, replayed, _ = three_ways(job, tmp_path, server.stop)
    assert plain[:2] == [200, True]  # both tries and the pause, as requests times adapter.send
    assert recorded[:2] == plain[:2], recorded  # recording does not change what the app sees
    # The replay answers each send; the app's response carries the last send's recorded time
    # (the README says so: an adapter that sends twice is not timed whole in a replay).
    assert replayed[0] == 200 and type(replayed[2]) is timedelta


# --- a PreparedRequest sent from two threads at once ----------------------------------------


def test_one_prepared_request_sent_from_threads(serve: Any, tmp_path: Path) -> None:
    """The one-off hook lives in the PreparedRequest's hooks dict, which threads sending the
    same PreparedRequest (or copies of it: ``copy()`` shares ``hooks``) share: a thread's
    dispatch can run and remove another's hook, whose response then keeps requests' measure
    of the in-memory replay. (Nondeterministic; a short switch interval makes it show: a few of 600 to
    1800 responses in most runs.)"""
    server = serve(APP)
    with timetracer_otel.record(dir=tmp_path) as rec, requests.Session() as s:
        recorded = {s.get(f"{server.url}/cached").elapsed for _ in range(1800)}
    server.stop()
    wrong: list[timedelta] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with connects_refused() as attempts, timetracer_otel.replay(rec.paths), \
                requests.Session() as s:
            for _ in range(300):
                prep = s.prepare_request(requests.Request("GET", f"{server.url}/cached"))

                def one(prep: requests.PreparedRequest = prep) -> None:
                    elapsed = s.send(prep).elapsed
                    if elapsed not in recorded:
                        wrong.append(elapsed)

                threads = [threading.Thread(target=one) for _ in range(6)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
    finally:
        sys.setswitchinterval(interval)
    assert attempts == []
    assert wrong == [], f"{len(wrong)} of 1800 replayed responses: {wrong[:3]}"


# --- the read1 loop holds a body once ---------------------------------------------------

SIZE = 64 << 20
BIG = bytes(range(256)) * (SIZE // 256)


async def _big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


_CLIENT = """
import sys, time
import requests
from timetracer_otel.replay_shims import requests as shim
r = requests.get(sys.argv[1], stream=True)
time.sleep(0.2)
def hwm():  # this process's peak RSS, in KiB (VmHWM: reset at exec, unlike ru_maxrss)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
_, (content, _, broke, _) = shim._read(r)
assert len(content) == int(sys.argv[2]) and broke is None
print((hwm() - base) * 1024)
"""


def test_reading_a_content_length_body_holds_it_once(serve: Any) -> None:
    """Recording reads a Content-Length body as it comes (``read1``): the body is held once
    at the peak, as one whole read holds it. Measured in a client process of its own (the
    server's copy not in its RSS)."""
    import subprocess

    server = serve(Starlette(routes=[Route("/big", _big)]))
    out = subprocess.run([sys.executable, "-c", _CLIENT, f"{server.url}/big", str(SIZE)],
                         capture_output=True, text=True, timeout=60, check=True)
    ratio = int(out.stdout.strip()) / SIZE
    assert ratio < 1.3, f"peak RSS grew by {ratio:.2f}x the body"


# --- older cassettes --------------------


def test_older_cassette_elapsed_of_a_redirect_hop_and_a_streamed_body(
    serve: Any, tmp_path: Path
) -> None:
    """Without ``elapsed_us`` the replay leaves requests' measure of the replay, never the
    recorded span's duration: the first hop of a redirect is answered under the OTel span of
    the whole ``get`` (the chain); a ``stream=True`` call's span includes the body read that
    record does."""
    from timetracer_otel.cassette import load_cassette, save_cassette

    server = serve(APP)

    def job() -> list[Any]:
        r = requests.get(f"{server.url}/hop")
        s = requests.get(f"{server.url}/slowbody", stream=True)
        return [r.history[0].elapsed, r.elapsed, s.elapsed]

    plain = job()
    with timetracer_otel.record(dir=tmp_path / "rec") as rec:
        job()
    server.stop()
    old = tmp_path / "old"
    old.mkdir()
    for n, path in enumerate(rec.paths):
        cassette = load_cassette(path)
        for call in cassette.interactions:
            call.response.pop("elapsed_us", None)  # as an older version wrote it
        save_cassette(cassette, old / f"c{n}.msgpack")
    with connects_refused(), timetracer_otel.replay(str(old)):
        replayed = job()
    assert plain[0] < timedelta(seconds=0.1) and plain[2] < timedelta(seconds=0.3)
    # a 302 answered at once replays as the whole chain; a streamed call, with its slow body
    assert replayed[0] < timedelta(seconds=0.1), replayed
    assert replayed[2] < timedelta(seconds=0.3), replayed


# --- `timetracer-otel diff` of two recordings ---------


def test_diff_of_two_recordings_of_the_same_calls(serve: Any, tmp_path: Path) -> None:
    """``cassette_diff`` leaves out what the clock puts in a response (the Date header, a
    requests call's ``elapsed_us``): two recordings of one job, identical but for timing, do
    not differ and ``timetracer-otel diff`` exits 0."""
    from timetracer_otel.cassette import load_cassette
    from timetracer_otel.inbound import cassette_diff

    server = serve(APP)
    cassettes = []
    for n in range(2):
        with timetracer_otel.record(dir=tmp_path / str(n)) as rec:
            requests.get(f"{server.url}/gz")
        [path] = rec.paths
        cassettes.append(load_cassette(path))
    assert cassette_diff(*cassettes) == []


# --- hooks, redirects, streaming, retries, cut bodies ---------------------------------------


@pytest.fixture
def cut() -> Any:
    """Promises 100 bytes, sends 3 pieces apart in time, closes."""
    with raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", b"defg", b"hij",
                    gap=0.05) as server:
        yield server


def test_fine_a_body_cut_short_in_pieces(cut: Any, tmp_path: Path) -> None:
    url, sock = cut

    def job() -> list[Any]:
        out: list[Any] = []
        try:
            _ = requests.get(url, timeout=2).content
        except Exception as exc:
            out.append((type(exc), str(exc)))
        for size in (4, None):
            r = requests.get(url, timeout=2, stream=True)
            try:
                out.append(list(r.iter_content(size)))
            except Exception as exc:
                out.append((type(exc), str(exc)))
        return out

    plain, recorded, replayed, _ = three_ways(job, tmp_path, lambda: close_listener(sock))
    assert plain[0][0] is requests.exceptions.ChunkedEncodingError
    assert recorded == plain and replayed == plain, (plain, recorded, replayed)


def test_fine_a_prepared_request_sent_twice(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        with requests.Session() as s:
            prep = s.prepare_request(requests.Request("GET", f"{server.url}/late"))
            a, b = s.send(prep), s.send(prep)
            return [a.elapsed >= timedelta(seconds=0.2), b.elapsed >= timedelta(seconds=0.2),
                    a.elapsed != b.elapsed, prep.hooks]

    plain, recorded, replayed, _ = three_ways(job, tmp_path, server.stop)
    assert recorded == plain and replayed == plain, (plain, recorded, replayed)


def test_fine_hooks_redirects_streaming_retry(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        out: list[Any] = []
        with requests.Session() as s:
            seen: list[Any] = []
            s.hooks["response"].append(lambda r, **kw: seen.append(r.elapsed))
            # a hook returning a new response
            new = requests.Response()
            new.status_code, new._content = 299, b"swapped"
            r = s.get(f"{server.url}/late", hooks={"response": lambda r, **kw: new})
            out.append([r.status_code, r.content])
            # a hook that raises: the next call is clean
            with pytest.raises(ZeroDivisionError):
                s.get(f"{server.url}/late", hooks={"response": lambda r, **kw: 1 / 0})
            r = s.get(f"{server.url}/hop")
            out.append([len(r.history), r.history[0].elapsed < r.elapsed,
                        r.elapsed >= timedelta(seconds=0.2),
                        len(r.request.hooks["response"])])
            r = s.get(f"{server.url}/hop", allow_redirects=False)
            out.append([r.status_code, r.next.url if r.next else None,
                        r.elapsed < timedelta(seconds=0.2)])
            # stream=True: elapsed is the time to the headers, not the slow body
            r = s.get(f"{server.url}/slowbody", stream=True)
            out.append([r.elapsed < timedelta(seconds=0.35), r.content])
            out.append([e >= timedelta(0) for e in seen])
            import pickle
            out.append(pickle.loads(pickle.dumps(requests.get(f"{server.url}/late"))).elapsed
                       >= timedelta(seconds=0.2))
            r = s.get(f"{server.url}/gz", stream=True)
            out.append([r.raw.read(7, decode_content=True), r.raw.read(decode_content=True)])
            r = s.get(f"{server.url}/gz", stream=True)
            out.append([r.raw.read(5), len(r.raw.read()), s.get(f"{server.url}/gz").json()])
        with requests.Session() as s:
            HITS["flaky"] = 0
            s.mount("http://", HTTPAdapter(max_retries=Retry(total=2, status_forcelist=[503],
                                                              backoff_factor=0)))
            r = s.get(f"{server.url}/flaky")
            out.append([r.status_code, r.elapsed >= timedelta(seconds=0.1)])
        return out

    plain, recorded, replayed, _ = three_ways(job, tmp_path, server.stop)
    assert recorded == plain, (plain, recorded)
    assert replayed == plain, (plain, replayed)
