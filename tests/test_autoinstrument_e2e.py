"""Zero code change: an httpx/requests app under plain ``opentelemetry-instrument`` records with
the ``timetracer`` exporter and replays with its upstream stopped; ``otlp,timetracer`` keeps
payloads off OTLP; and the Collector path (app → rotel → ``timetracer-otel collect``) writes a
cassette that replays. Every process here is a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.upstream_app import app
from timetracer_otel.autoinstrument import launcher_defaults
from timetracer_otel.cassette import load_cassette
from timetracer_otel.exporters.otlp import OTLPReceiver
from timetracer_otel.exporters.writer import CassetteWriter

BIN = Path(sys.executable).parent
# Found the way the CLI finds it: beside this interpreter, else on PATH (venvs that borrow
# the system site-packages have no console scripts of their own).
INSTRUMENT = str(
    BIN / "opentelemetry-instrument"
    if (BIN / "opentelemetry-instrument").exists()
    else shutil.which("opentelemetry-instrument") or BIN / "opentelemetry-instrument"
)
APP = '''
import os, httpx, requests
base = os.environ["UPSTREAM_URL"]
def main():
    with httpx.Client() as c:
        print("httpx", c.get(base + "/items", params={"page": 2}).json())
        r = c.post(base + "/echo", content=b"\\x01\\x02abc")
        print("echo", r.content, r.headers["x-length"])
    print("requests", requests.get(base + "/items", params={"page": 3}, timeout=5).json())
if os.environ.get("APP_ROOT_SPAN"):
    from opentelemetry import trace
    with trace.get_tracer("app").start_as_current_span("nightly-job"):
        main()
else:
    main()
'''


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "TIMETRACER_", "PYTEST_"))}
    env.update(extra)
    return env


def instrumented(script: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INSTRUMENT, sys.executable, str(script)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def test_launcher_defaults_only_fill_what_is_unset() -> None:
    assert launcher_defaults({}) == []
    env = {"TIMETRACER_MODE": "replay"}
    assert launcher_defaults(env) == [
        "OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none", "OTEL_LOGS_EXPORTER=none"]
    env = {"TIMETRACER_MODE": "record", "OTEL_TRACES_EXPORTER": "otlp,timetracer",
           "OTEL_METRICS_EXPORTER": "console"}
    changed = launcher_defaults(env)
    # The gRPC exporter is not installed here, the HTTP one is: otlp goes over HTTP.
    assert changed == ["OTEL_LOGS_EXPORTER=none", "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp,timetracer" and env["OTEL_METRICS_EXPORTER"] == "console"


def test_a_setup_that_would_skip_instrumentation_stops_with_one_sentence(script: Path) -> None:
    env = clean_env(TIMETRACER_MODE="replay", TIMETRACER_CASSETTE=str(script.parent),
                    OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                    UPSTREAM_URL="http://127.0.0.1:1")
    out = instrumented(script, env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "timetracer-otel: OTEL_TRACES_EXPORTER asks for OTLP over gRPC, whose exporter is not "
        "installed, so opentelemetry-instrument would skip all instrumentation; set "
        "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf or pip install opentelemetry-exporter-otlp-proto-grpc."]



@pytest.mark.parametrize(("setting", "needle"), [
    ({"TIMETRACER_MODE": "bogus"}, "TIMETRACER_MODE='bogus' is not valid"),
    ({"TIMETRACER_MODE": "record", "TIMETRACER_SAMPLE_RATE": "x"}, "TIMETRACER_SAMPLE_RATE='x'"),
    ({"TIMETRACER_MODE": "record", "TIMETRACER_MAX_PAYLOAD_BYTES": "inf"}, "not a finite number"),
    ({"TIMETRACER_MODE": "record", "TIMETRACER_REDACT": "bogus"}, "TIMETRACER_REDACT rule 'bogus'"),
    ({"OTEL_TRACES_EXPORTER": "timetracer", "TIMETRACER_FORMAT": "yaml"}, "TIMETRACER_FORMAT='yaml'"),
])
def test_a_bad_setting_stops_the_launcher_before_the_app_runs(
    script: Path, tmp_path: Path, setting: dict[str, str], needle: str
) -> None:
    # In the program, a bad value failed OTel's configurator: a traceback, then the app ran
    # unrecorded with exit 0.
    env = clean_env(TIMETRACER_DIR=str(tmp_path / "c"), UPSTREAM_URL="http://127.0.0.1:1", **setting)
    out = instrumented(script, env)
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("timetracer-otel: ") and needle in line

def test_record_and_replay_under_plain_opentelemetry_instrument(
    serve: Any, script: Path, tmp_path: Path
) -> None:
    server = serve(app)
    cassettes = tmp_path / "cassettes"
    rec = instrumented(script, clean_env(
        OTEL_TRACES_EXPORTER="timetracer", TIMETRACER_MODE="record", TIMETRACER_DIR=str(cassettes),
        UPSTREAM_URL=server.url))
    assert rec.returncode == 0, rec.stderr
    assert "Failed to auto initialize" not in rec.stderr
    (path,) = cassettes.rglob("*.msgpack")
    c = load_cassette(path)
    assert [s.library for s in c.interactions] == ["httpx", "httpx", "requests"]
    assert c.recorder.via == "exporter" and c.name == "app"
    server.stop()

    # No OTEL_* variables at all: the distro's gRPC defaults would break; replay needs none.
    rep = instrumented(script, clean_env(
        TIMETRACER_MODE="replay", TIMETRACER_CASSETTE=str(cassettes), UPSTREAM_URL=server.url))
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout and "'n': " in rep.stdout
    assert "Failed to auto initialize" not in rep.stderr
    assert len(list(cassettes.rglob("*.msgpack"))) == 1  # replay wrote nothing

    # A call the cassette lacks fails loudly instead of going to the (stopped) network.
    miss = instrumented(script, clean_env(
        TIMETRACER_MODE="replay", TIMETRACER_CASSETTE=str(cassettes), UPSTREAM_URL="http://127.0.0.1:9"))
    assert miss.returncode != 0 and "ReplayMissError" in miss.stderr


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[OTLPReceiver]:
    r = OTLPReceiver(CassetteWriter(str(tmp_path / "sink"), via="collector", quiet_ns=10**8),
                     host="127.0.0.1", port=0).start()
    yield r
    r.stop()


def test_otlp_and_timetracer_together_keep_payloads_off_otlp(
    serve: Any, script: Path, tmp_path: Path, sink: OTLPReceiver
) -> None:
    server = serve(app)
    cassettes = tmp_path / "cassettes"
    out = instrumented(script, clean_env(
        OTEL_TRACES_EXPORTER="otlp,timetracer", TIMETRACER_MODE="record", TIMETRACER_DIR=str(cassettes),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.port}", UPSTREAM_URL=server.url))
    assert out.returncode == 0, out.stderr
    (local,) = cassettes.rglob("*.msgpack")
    assert len(load_cassette(local).interactions) == 3
    sink.stop()  # writes what OTLP delivered
    (sent,) = (tmp_path / "sink").rglob("*.msgpack")
    spans = load_cassette(sent).spans
    methods = {s.attributes.get("http.request.method") or s.attributes.get("http.method") for s in spans}
    assert len(spans) == 3 and methods == {"GET", "POST"}
    assert all(s.library is None and s.request is None for s in spans)
    assert not any(k.startswith("timetracer.") for s in spans for k in s.attributes)


def test_a_script_exporting_otlp_stopped_by_sigterm_sends_what_it_recorded(
    serve: Any, tmp_path: Path, sink: OTLPReceiver
) -> None:
    """The Collector path (spans exported over OTLP, no cassette writer in the app): a SIGTERM
    still flushes the batch span processor before the script ends by the signal."""
    import signal

    server = serve(app)
    script = tmp_path / "sleepy.py"
    script.write_text(APP + "print('ready', flush=True)\nimport time\ntime.sleep(60)\n")
    env = clean_env(OTEL_TRACES_EXPORTER="otlp", TIMETRACER_MODE="record",
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink.port}",
                    UPSTREAM_URL=server.url, APP_ROOT_SPAN="1")
    proc = subprocess.Popen([INSTRUMENT, sys.executable, str(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while "ready" not in (line := proc.stdout.readline()):
        assert line, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    sink.stop()  # writes what OTLP delivered
    (sent,) = (tmp_path / "sink").rglob("*.msgpack")
    sent_cassette = load_cassette(sent)
    assert sent_cassette.name == "nightly-job"
    assert len(sent_cassette.interactions) == 3  # the payloads rode on the spans


def _start_collect(directory: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "timetracer_otel.cli", "collect", "--listen", "127.0.0.1:0",
         "--dir", str(directory), "--quiet-period", "0.3"],
        env=clean_env(), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1/traces", line)
    assert match, f"timetracer-otel collect did not start: {line}"
    return proc, int(match.group(1))


def _start_rotel(tmp_path: Path, sink_port: int) -> tuple[subprocess.Popen[bytes], int]:
    import rotel

    agent = Path(rotel.__file__).parent / "rotel-agent"
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [str(agent), "start", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
         "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}", "--exporter", "otlp",
         "--otlp-exporter-endpoint", f"http://127.0.0.1:{sink_port}",
         "--otlp-exporter-protocol", "http", "--pid-file", str(tmp_path / "rotel.pid")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", http_port)) == 0:
                return proc, http_port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the rotel collector (pip install rotel) did not start on 127.0.0.1:{http_port}")


def test_spans_through_a_real_collector_become_a_cassette_that_replays(
    serve: Any, script: Path, tmp_path: Path
) -> None:
    server = serve(app)
    collected = tmp_path / "collected"
    collect, collect_port = _start_collect(collected)
    rotel_proc, rotel_port = _start_rotel(tmp_path, collect_port)
    try:
        # TIMETRACER_MODE=record with only the otlp exporter: the payloads ride on the spans.
        rec = instrumented(script, clean_env(
            TIMETRACER_MODE="record", OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{rotel_port}", APP_ROOT_SPAN="1",
            OTEL_SERVICE_NAME="nightly", UPSTREAM_URL=server.url))
        assert rec.returncode == 0, rec.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(collected.rglob("*.msgpack")):
            time.sleep(0.1)  # written once the root arrived and the trace was quiet for 0.3 s
        (path,) = collected.rglob("*.msgpack")
    finally:
        rotel_proc.terminate()
        rotel_proc.wait(10)
        collect.send_signal(signal.SIGTERM)
        _, err = collect.communicate(timeout=30)
    assert collect.returncode == 0, err
    assert "wrote 1 cassette(s)" in err
    c = load_cassette(path)
    assert c.name == "nightly-job" and c.complete and c.recorder.via == "collector"
    assert c.resource["service.name"] == "nightly"
    assert [s.library for s in c.interactions] == ["httpx", "httpx", "requests"]
    assert type(c.interactions[1].request) is type(c.interactions[1].request)
    server.stop()

    rep = instrumented(script, clean_env(
        TIMETRACER_MODE="replay", TIMETRACER_CASSETTE=str(path), APP_ROOT_SPAN="1",
        UPSTREAM_URL=server.url))
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout
