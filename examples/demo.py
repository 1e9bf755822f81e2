"""The README's first command: record examples/http_client.py against a local upstream, stop
the upstream, replay it offline, check the output is identical, and show the cassette.

    python examples/demo.py
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "timetracer_otel.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"the example upstream did not start on 127.0.0.1:{port}")


def run(cmd: list[str], env: dict[str, str]) -> str:
    print("$", " ".join(cmd[2:] if cmd[:2] == CLI[:2] else cmd), flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"command failed with exit code {out.returncode}")
    return out.stdout


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="timetracer-demo-"))
    cassettes = workdir / "cassettes"
    port = free_port()
    env = dict(os.environ, UPSTREAM_URL=f"http://127.0.0.1:{port}")
    script = [sys.executable, str(HERE / "http_client.py")]

    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(port)])
    try:
        wait_for(port)
        live = run([*CLI, "record", "--dir", str(cassettes), "--", *script], env)
    finally:
        upstream.terminate()
        upstream.wait()
    print(live)

    replayed = run([*CLI, "replay", "--cassette", str(cassettes), "--", *script], env)
    print(replayed)
    if replayed != live:
        raise SystemExit("replayed output differs from the live run")
    print("replay output is identical to the live run, with the upstream stopped\n")

    files = sorted(cassettes.rglob("*.msgpack"))
    subprocess.run([*CLI, "show", str(files[0])], env=env, check=True)
    if "--keep" not in sys.argv:
        shutil.rmtree(workdir)
    else:
        print(f"cassettes kept in {cassettes}")


if __name__ == "__main__":
    main()
