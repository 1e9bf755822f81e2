"""Why recording costs more end to end on a small machine: 1b's loop on live loopback.

    python -m benchmarks.contention            # 21 rounds, about a minute on 2 cores

The app makes sync httpx calls to the upstream (``benchmarks/upstream.py``, its own uvicorn
process) inside server spans of 10, in blocks of 500 calls after 100 untimed ones (whose
backlog the writer carries into the window, as the window's is left after it and flushed
before the next block); each round runs every configuration once, in a shuffled order, and
the table gives the median over rounds of each configuration's wall µs per call minus the
same round's OTel-only block:

- ``record``: one ``record()`` (its writer process converting and writing, as users run it);
- ``record, writer process discards``: the same request path and hand-off, with a writer
  process that reads what it is sent and does nothing with it;
- ``... + CPU burner at 5% / 10%``: that, with a separate process burning one core's CPU for
  2 (4) ms of every 40 ms: CPU spent beside the app and the upstream and nothing else.

If the burner costs per call about what the writer process's work does, the end-to-end cost
is set by how much CPU recording spends in all, not by where it spends it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

BLOCK = 500
LEAD = 100
# A writer process that reads its frames and keeps nothing (what _BOOT starts, patched).
_DISCARDING_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from timetracer_otel.exporters import writer; "
    "writer.CassetteWriter.add_now = lambda self, item: None; "
    "from timetracer_otel.exporters.sink import main; main()"
)


def burn(busy_ms: float, idle_ms: float) -> None:
    """Busy ``busy_ms`` then asleep ``idle_ms``, forever (Python work: dicts and strings)."""
    table: dict[str, int] = {}
    while True:
        until = time.perf_counter() + busy_ms / 1000
        while time.perf_counter() < until:
            for i in range(100):
                table[str(i)] = i * 2
        time.sleep(idle_ms / 1000)


@contextlib.contextmanager
def discarding_boot() -> Iterator[None]:
    """Writer processes started inside run :data:`_DISCARDING_BOOT`. A writer's thread starts
    its process at the writer's first span and reads ``sink._BOOT`` then: start the
    discarding writer inside, flush it (which waits for its process), and any other outside
    (swapped around both, the recording's process discarded too)."""
    from timetracer_otel.exporters import sink

    boot, sink._BOOT = sink._BOOT, _DISCARDING_BOOT
    try:
        yield
    finally:
        sink._BOOT = boot


def check_boots(record: Any, discard: Any) -> None:
    """Raise unless ``discard``'s writer process runs the discarding boot and ``record``'s the
    real one (read from each process's command line)."""
    for name, writer in (("record", record), ("discard", discard)):
        child = getattr(writer, "_sink", None)
        if child is None:
            raise RuntimeError(f"the {name} writer has no writer process")
        cmdline = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        if (_DISCARDING_BOOT in cmdline) != (name == "discard"):
            raise RuntimeError(f"the {name} writer's process runs the wrong boot code")


def measure(rounds: int) -> dict[str, list[float]]:
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.trace import SpanKind

    import timetracer_otel
    from benchmarks.micro import _otel
    from benchmarks.upstream import Upstream
    from timetracer_otel import replay_shims
    from timetracer_otel.config import Mode
    from timetracer_otel.exporters.writer import CassetteWriter
    from timetracer_otel.replay_shims.base import STATE
    from timetracer_otel.runtime import _dispatch_for, _here, sdk_provider

    tracer = _otel()
    replay_shims.install(["httpx"])
    HTTPXClientInstrumentor().instrument()
    tmp = tempfile.mkdtemp(prefix="bench-contention-")
    burners = {
        pct: subprocess.Popen([sys.executable, "-m", "benchmarks.contention", "--burn",
                               str(busy), str(40 - busy)], cwd=ROOT)
        for pct, busy in (("5%", 2), ("10%", 4))
    }
    for b in burners.values():
        os.kill(b.pid, signal.SIGSTOP)
    try:
        with Upstream() as url, httpx.Client(base_url=url) as client:

            def run(count: int) -> None:
                for j in range(count // 10):
                    with tracer.start_as_current_span("GET /fanout", kind=SpanKind.SERVER):
                        for i in range(10):
                            client.get("/items", params={"i": i + j % 7})

            with timetracer_otel.record(dir=f"{tmp}/rec", libraries=["httpx"]) as rec:
                real = rec.writer
                _here.set(None)  # the writer set on the dispatch takes the spans, not the run's
                dispatch = _dispatch_for(sdk_provider())
                discarding = CassetteWriter(f"{tmp}/discard", isolate=True)
                # Both writer processes start (and import) before any window, each with
                # its own boot.
                with discarding_boot():
                    dispatch.writer = discarding
                    run(LEAD)
                    discarding.flush()
                dispatch.writer = real
                run(LEAD)
                real.flush()
                check_boots(real, discarding)
                configs: dict[str, tuple[Any, str | None]] = {
                    "OTel only": (None, None),
                    "record": (real, None),
                    "record, writer process discards": (discarding, None),
                    "record, writer process discards + CPU burner at 5%": (discarding, "5%"),
                    "record, writer process discards + CPU burner at 10%": (discarding, "10%"),
                }
                per_call: dict[str, list[float]] = {k: [] for k in configs}
                for r in range(rounds):
                    order = list(configs)
                    random.Random(r).shuffle(order)
                    for name in order:
                        writer, burner = configs[name]
                        STATE.mode = Mode.OFF if writer is None else Mode.RECORD
                        dispatch.writer = writer
                        run(LEAD)
                        if burner is not None:
                            os.kill(burners[burner].pid, signal.SIGCONT)
                        t0 = time.perf_counter()
                        run(BLOCK)
                        per_call[name].append((time.perf_counter() - t0) * 1e6 / BLOCK)
                        if burner is not None:
                            os.kill(burners[burner].pid, signal.SIGSTOP)
                        if writer is not None:
                            # Its backlog done here, not in the next configuration's window
                            # (each window gets the backlog of its own untimed lead instead).
                            writer.flush()
                STATE.mode, dispatch.writer = Mode.RECORD, real
                discarding.close()
    finally:
        for b in burners.values():
            b.kill()
    return per_call


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--burn", nargs=2, type=float, metavar=("BUSY_MS", "IDLE_MS"),
                   help=argparse.SUPPRESS)  # the burner process itself
    a = p.parse_args()
    if a.burn:
        burn(*a.burn)
        return
    started, load = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
    per_call = measure(a.rounds)
    base = per_call["OTel only"]
    print(f"| configuration | µs/call | over OTel only, median of {a.rounds} rounds (min-max) |")
    print("|---|---:|---|")
    over: dict[str, list[float]] = {}
    for name, values in per_call.items():
        over[name] = [v - b for v, b in zip(values, base, strict=True)]
        extra = "" if name == "OTel only" else (
            f"+{statistics.median(over[name]):.1f} ({min(over[name]):.1f} to {max(over[name]):.1f})")
        print(f"| {name} | {statistics.median(values):.1f} | {extra} |")
    out = ROOT / "benchmarks" / "results" / "contention-latest.json"
    out.write_text(json.dumps({
        "started": started, "rounds": a.rounds,
        "calls_per_block": BLOCK, "per_call_us": per_call, "over_otel_us": over,
        "load_average_at_start": load,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
