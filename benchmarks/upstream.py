"""The dependency every HTTP scenario calls: a small JSON service served by uvicorn in its own
process (so its CPU time never lands on the measured process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HITS = 0


async def items(request: Request) -> JSONResponse:
    global HITS
    HITS += 1
    i = int(request.query_params.get("i", "0"))
    return JSONResponse(
        {"i": i, "name": f"item-{i}", "tags": ["alpha", "beta", "gamma"], "price": 12.5 + i,
         "description": "a small JSON document like a typical internal API answer " * 3}
    )


async def hits(request: Request) -> JSONResponse:
    return JSONResponse({"hits": HITS})


app = Starlette(routes=[Route("/items", items), Route("/hits", hits)])

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """``with Upstream() as url:`` runs this app on 127.0.0.1 in a uvicorn subprocess."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.upstream:app", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--no-access-log",
               "--lifespan", "off"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.__exit__()
        raise SystemExit(f"the benchmark upstream (uvicorn) did not start on {self.url}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
