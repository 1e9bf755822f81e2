"""Shared plumbing: worker subprocesses, statistics, optional comparison tools, rows."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def tool_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("timetracer-otel", "timetracer", "vcrpy", "pyinstrument", "httpx", "starlette",
                 "opentelemetry-sdk", "msgspec", "asyncpg", "psycopg"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


UPSTREAM_TT = "timetracer"  # upstream timetracer 1.6.0 (the `bench` extra)
VCR = "vcr"
MISSING_BENCH = ("not installed; run with the bench venv (see benchmarks/README.md): "
                 "python -m venv --system-site-packages /work/bench-venv && "
                 "/work/bench-venv/bin/pip install 'timetracer==1.6.0' vcrpy pyinstrument")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --- statistics ------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Row:
    """One line of the table: the median of several runs, with their min and max."""

    scenario: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""
    ratio: str = ""  # e.g. "0.31x upstream record"
    target: str = ""
    met: bool | None = None
    skipped: bool = False

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.values:
            d.update(summary(self.values))
        return d


def timed_runs(fn: Callable[[], float], runs: int) -> list[float]:
    return [fn() for _ in range(runs)]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Upstream timetracer prints a line per request; send it where a server log would go."""
    saved = sys.stderr
    sys.stderr = io.StringIO() if os.environ.get("BENCH_KEEP_STDERR") else open(os.devnull, "w")  # noqa: SIM115
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = saved


def otel_noop_provider() -> Any:
    """The "OTel only" baseline: an SDK provider, set globally, exporting to nowhere."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class NoopExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(NoopExporter()))
    trace.set_tracer_provider(provider)
    return provider


# --- workers: each measured configuration runs in a fresh process ------------------------------


def run_worker(module: str, args: dict[str, Any], *, timeout: float = 900,
               profile: str | None = None) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module>`` with ``args`` as JSON; return its result dict."""
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "pyinstrument", "--show-all", "-o", profile, "-r", "text"]
    cmd += ["-m", f"benchmarks.{module}", json.dumps(args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OTEL_SDK_DISABLED", "false")
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            out: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            out.setdefault("_seconds", round(time.monotonic() - start, 1))
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"error": f"worker {module} {args.get('mode', '')} failed (exit {proc.returncode}): "
                     + " | ".join(tail)}


def worker_main(run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a worker module: JSON args in argv[1], one result line on stdout."""
    args = json.loads(sys.argv[1])
    result = run(args)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
