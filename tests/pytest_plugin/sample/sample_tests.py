"""The sample project's tests: real calls on the first run, replayed afterwards."""

from __future__ import annotations

import os

import httpx
import pytest
import requests

UPSTREAM = os.environ["SAMPLE_UPSTREAM"]
KIND = os.environ.get("SAMPLE_KIND", "widgets")


@pytest.mark.timetracer
def test_search(client: httpx.Client, timetracer) -> None:
    body = client.get(f"/search/{KIND}", params={"q": "blue"}).json()
    assert body == {"path": f"/search/{KIND}", "query": "q=blue"}
    assert [c.library for c in timetracer.calls] == ["httpx", "httpx"]


@pytest.mark.timetracer
class TestMore:
    async def test_async(self) -> None:
        async with httpx.AsyncClient() as c:
            r = await c.post(f"{UPSTREAM}/orders", json={"sku": "A1"})
        assert (r.status_code, type(r.json())) == (200, dict)

    @pytest.mark.parametrize("n", [1, 22])
    def test_requests(self, n: int) -> None:
        r = requests.get(f"{UPSTREAM}/n/{n}", timeout=5)
        assert r.json()["path"] == f"/n/{n}"


def test_plain() -> None:
    assert True
