"""An ordinary script calling an upstream with httpx and requests. Nothing here knows about
timetracer-otel: `timetracer-otel record -- python examples/http_client.py` records it and
`timetracer-otel replay --cassette DIR -- python examples/http_client.py` replays it offline.

UPSTREAM_URL says where the upstream is (examples/demo.py starts one on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import httpx
import requests

BASE = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8765")


async def fetch_pages() -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=BASE) as client:
        responses = await asyncio.gather(*(client.get("/items", params={"page": p}) for p in (1, 2, 3)))
    return [r.json() for r in responses]


def main() -> None:
    with httpx.Client(base_url=BASE) as client:
        r = client.get("/items", params={"page": 1})
        print("httpx GET /items", r.status_code, r.json())
        r = client.post("/echo", content=b"hello upstream")
        print("httpx POST /echo", r.status_code, r.json())
        r = client.get("/blob")
        print("httpx GET /blob", r.status_code, type(r.content).__name__, len(r.content),
              hashlib.sha256(r.content).hexdigest()[:16])
        with client.stream("GET", "/stream") as s:
            print("httpx stream", [line for line in s.iter_lines()])
        r = client.get("/broken")
        print("httpx GET /broken", r.status_code, r.json())
    print("httpx async", asyncio.run(fetch_pages()))
    r2 = requests.get(f"{BASE}/items", params={"page": 7}, timeout=5)
    print("requests GET /items", r2.status_code, r2.json())
    try:
        httpx.get("http://127.0.0.1:9/unreachable", timeout=1)
    except httpx.ConnectError as exc:
        print("httpx error", type(exc).__name__)


if __name__ == "__main__":
    main()
