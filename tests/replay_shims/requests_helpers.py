"""Shared by the requests tests: a job run plain, recorded and replayed, a raw HTTP server
that cuts its body short, and a streamed body's chunks up to the error that ended them."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timetracer_otel
from tests.conftest import connects_refused


def three_ways(job: Callable[[], Any], tmp_path: Path, stop: Callable[[], None]) -> list[Any]:
    """``job`` plain, recorded, then replayed with the upstream stopped (nothing connects):
    its three results and the replay."""
    plain = job()
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert attempts == [], attempts
    return [plain, recorded, replayed, rep]


@contextmanager
def raw_server(*pieces: bytes, gap: float = 0.0) -> Iterator[tuple[str, socket.socket]]:
    """A raw HTTP server: for each connection it reads the request, sends ``pieces`` (``gap``
    seconds apart) and closes. Yields its URL and listening socket; stopped at the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                for i, piece in enumerate(pieces):
                    if i:
                        time.sleep(gap)
                    conn.sendall(piece)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    close_listener(sock)
    thread.join(5)


def close_listener(sock: socket.socket) -> None:
    """Stop a listening socket and wake the thread blocked in its ``accept()``, which
    ``close()`` alone does not do on Linux."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def chunks(response: Any, seen: list[Any], chunk_size: int | None) -> list[Any]:
    """``seen``, then the chunks of ``response.iter_content(chunk_size)`` and, where one ended
    them, the error's class and message."""
    try:
        for chunk in response.iter_content(chunk_size=chunk_size):
            seen.append(chunk)
    except Exception as exc:
        seen.append((type(exc), str(exc)))
    return seen
