"""Sample tests for record modes, strictness, hybrid replay, network blocking and anyio."""

from __future__ import annotations

import contextlib
import os
import socket

import httpx
import pytest
import requests

UPSTREAM = os.environ["SAMPLE_UPSTREAM"]
pytestmark = pytest.mark.timetracer  # module-level: every test here has a cassette


def calls(var: str, prefix: str) -> None:
    for i in range(int(os.environ.get(var, "2"))):
        assert httpx.get(f"{UPSTREAM}/{prefix}/{i}").status_code == 200


def test_grows() -> None:
    calls("GROW", "grow")


def test_fewer() -> None:
    calls("CALLS", "fewer")


@pytest.mark.timetracer(allow_unused=True)
def test_fewer_allowed() -> None:
    calls("CALLS", "allowed")


@pytest.mark.timetracer(live=["requests"])
def test_hybrid(timetracer) -> None:
    assert httpx.get(f"{UPSTREAM}/h").json()["path"] == "/h"
    assert requests.get(f"{UPSTREAM}/live", timeout=5).json()["path"] == "/live"
    assert [c.library for c in timetracer.calls] == ["httpx"]


@pytest.mark.anyio
async def test_anyio(timetracer) -> None:
    async with httpx.AsyncClient() as c:
        assert (await c.get(f"{UPSTREAM}/any")).json() == {"path": "/any", "query": ""}
    assert len(timetracer.calls) == 1
    assert timetracer.unused == []


def test_raw_loopback() -> None:
    host, port = UPSTREAM.removeprefix("http://").split(":")
    socket.create_connection((host, int(port)), timeout=5).close()


def test_outside() -> None:
    socket.create_connection(("192.0.2.1", 80), timeout=5).close()  # TEST-NET-1


def test_outside_swallowed() -> None:
    with contextlib.suppress(Exception):
        socket.create_connection(("192.0.2.1", 80), timeout=5).close()


def test_never_recorded() -> None:
    pass


def test_changes() -> None:
    """A call whose query value changes between runs (V)."""
    assert httpx.get(f"{UPSTREAM}/q", params={"v": os.environ.get("V", "a")}).status_code == 200
