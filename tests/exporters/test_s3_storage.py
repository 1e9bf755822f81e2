"""Cassettes in S3 (a real moto server on 127.0.0.1): record writes there, ls/show/replay read
from there, and the writer's own S3 calls never show up as spans or interactions."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner

import timetracer_otel
from tests.upstream_app import app
from timetracer_otel.cassette import Cassette
from timetracer_otel.cli import main
from timetracer_otel.errors import CassetteError
from timetracer_otel.exporters.s3 import S3Storage
from timetracer_otel.exporters.storage import load_sources, read_sources, storage_for


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # a missing service fails, naming it
        pytest.fail("the moto S3 server is needed: pip install 'moto[server]'")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    name = f"tt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def job(c: httpx.Client) -> list[Any]:
    return [c.get("/items", params={"page": 4}).json(), c.post("/echo", content=b"s3\x00").content]


def test_record_to_s3_then_ls_show_and_replay_from_it(serve: Any, bucket: str, tmp_path: Path) -> None:
    server = serve(app)
    location = f"s3://{bucket}/runs/nightly"
    with timetracer_otel.record(dir=location) as rec, httpx.Client(base_url=server.url) as c:
        live = job(c)
    (url,) = rec.paths
    assert url.startswith(f"{location}/") and url.endswith(".msgpack")
    # Only the app's two calls: the writer's put_object is not an interaction.
    ((name, cassette),) = load_sources(location)
    assert name == url and type(cassette) is Cassette
    assert [s.library for s in cassette.interactions] == ["httpx", "httpx"]
    assert all("amazonaws" not in (s.label or "") and "127.0.0.1:" + server.url.rsplit(":", 1)[1]
               in (s.label or s.name) for s in cassette.interactions)
    ((_, data),) = read_sources(url)  # the object itself, by its full URL
    assert type(data) is bytes and data[:1] != b"{"

    runner = CliRunner()
    listed = runner.invoke(main, ["ls", location], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert url in listed.output and "httpx" in listed.output
    shown = runner.invoke(main, ["show", url])
    assert shown.exit_code == 0 and "httpx" in shown.output

    server.stop()
    with timetracer_otel.replay(location) as rep, httpx.Client(base_url=server.url) as c:
        replayed = job(c)
    assert replayed == live and type(replayed[1]) is bytes
    assert rep.report.exact == 2


def test_cli_record_and_replay_with_s3_dir(serve: Any, bucket: str, tmp_path: Path) -> None:
    server = serve(app)
    script = tmp_path / "job.py"
    script.write_text(
        "import os, httpx\n"
        "print(httpx.get(os.environ['UPSTREAM_URL'] + '/items', params={'page': 9}).json())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TIMETRACER_"))}
    env["UPSTREAM_URL"] = server.url
    cli = [str(Path(sys.executable).parent / "timetracer-otel")]
    location = f"s3://{bucket}/cli"
    rec = subprocess.run([*cli, "record", "--dir", location, "--", sys.executable, str(script)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert rec.returncode == 0, rec.stderr
    (url,) = S3Storage(location).list()
    assert f"recorded 1 cassette(s) in {location}" in rec.stderr and url in rec.stderr
    server.stop()
    rep = subprocess.run([*cli, "replay", "--cassette", location, "--", sys.executable, str(script)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout and "'page': '9'" in rep.stdout


def test_s3_errors_are_one_sentence(bucket: str) -> None:
    missing = f"s3://{bucket}-missing/x"
    with pytest.raises(CassetteError, match=r"cannot use s3://.*-missing for cassettes \(.*\); check"):
        storage_for(missing).check()
    result = CliRunner().invoke(main, ["ls", f"s3://{bucket}/empty"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"timetracer-otel: s3://{bucket}/empty: no cassettes there; check the bucket and prefix.")
    result = CliRunner().invoke(main, ["show", f"s3://{bucket}/none.msgpack"])
    assert result.exit_code == 2 and "no such cassette" in result.output
