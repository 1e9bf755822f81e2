"""Cassettes in S3 (a real moto server on 127.0.0.1): record writes there, ls/show/replay read
from there, and the writer's own S3 calls never show up as spans or interactions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import timetracer_otel
from tests.conftest import plain_env, timetracer_cli
from tests.upstream_app import app
from timetracer_otel.cassette import Cassette, loads
from timetracer_otel.cli import main
from timetracer_otel.errors import CassetteError
from timetracer_otel.exporters.s3 import S3Storage
from timetracer_otel.exporters.storage import (
    add_interactions,
    load_one,
    load_sources,
    read_sources,
    storage_for,
)


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
    env = plain_env(UPSTREAM_URL=server.url)
    location = f"s3://{bucket}/cli"
    rec = timetracer_cli("record", "--dir", location, "--", sys.executable, str(script), env=env)
    assert rec.returncode == 0, rec.stderr
    (url,) = S3Storage(location).list()
    assert f"recorded 1 cassette(s) in {location}" in rec.stderr and url in rec.stderr
    server.stop()
    rep = timetracer_cli("replay", "--cassette", location, "--", sys.executable, str(script),
                         env=env)
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


def test_replay_on_miss_record_keeps_new_calls_in_the_s3_object(
    serve: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    server = serve(app)
    with timetracer_otel.record(dir=f"s3://{bucket}/obj") as rec, \
            httpx.Client(base_url=server.url) as c:
        first = c.get("/items", params={"page": 1}).json()
    (url,) = rec.paths
    with timetracer_otel.replay(url, on_miss="record", strict=True) as rep, \
            httpx.Client(base_url=server.url) as c:
        assert c.get("/items", params={"page": 1}).json() == first  # from the object
        echoed = c.post("/echo", content=b"new\x00").content  # lacking: live, then kept
    assert rep.written == [url] and [s.library for s in rep.appended] == ["httpx"]
    # Another writer replaces the object between a read and the conditional write: the
    # write fails, the object is read again, and neither writer's calls are lost.
    storage = S3Storage(url)
    read_tagged = S3Storage.read_tagged
    raced: list[str] = []

    def read_then_race(self: S3Storage, name: str) -> tuple[bytes, str]:
        got = read_tagged(self, name)
        if not raced:
            raced.append(name)
            assert add_interactions(url, [_labelled(rep.appended[0], "other")], "replay") == url
        return got

    with monkeypatch.context() as patched:
        patched.setattr(S3Storage, "read_tagged", read_then_race)
        assert add_interactions(url, [_labelled(rep.appended[0], "ours")], "replay") == url
    labels = [s.label for s in loads(storage.read(url), url).interactions]
    assert raced == [url] and labels[-2:] == ["other", "ours"] and len(labels) == 4
    server.stop()
    with timetracer_otel.replay(url, strict=True) as again, httpx.Client(base_url=server.url) as c:
        assert c.get("/items", params={"page": 1}).json() == first
        replayed = c.post("/echo", content=b"new\x00").content
    assert replayed == echoed and type(replayed) is bytes and again.report.misses == []


def _labelled(span: Any, label: str) -> Any:
    import msgspec

    return msgspec.structs.replace(span, label=label, key=f"{span.key}-{label}")


def test_cli_replay_on_miss_record_adds_an_object_to_the_s3_prefix(
    serve: Any, bucket: str, tmp_path: Path
) -> None:
    server = serve(app)
    script = tmp_path / "job.py"
    script.write_text(
        "import os, httpx\n"
        "for page in os.environ['PAGES'].split(','):\n"
        "    print(httpx.get(os.environ['UPSTREAM_URL'] + '/items', params={'page': page}).json())\n")
    env = plain_env(UPSTREAM_URL=server.url, PAGES="1")
    location = f"s3://{bucket}/cli-append"

    def replay(*args: str) -> subprocess.CompletedProcess[str]:
        return timetracer_cli("replay", "--cassette", location, *args, "--", sys.executable,
                              str(script), env=env)

    rec = timetracer_cli("record", "--dir", location, "--", sys.executable, str(script), env=env)
    assert rec.returncode == 0, rec.stderr
    env["PAGES"] = "1,2"
    added = replay("--on-miss", "record")
    assert added.returncode == 0, added.stderr
    _, appended = S3Storage(location).list()
    assert appended.startswith(f"{location}/appended-") and appended.endswith(".msgpack")
    assert f"1 call(s) the cassette lacked were recorded into {appended}" in added.stderr
    assert [s.label for s in load_one(appended).interactions] == [f"GET {server.url}/items?page=2"]
    server.stop()
    again = replay()  # on_miss=error, upstream down: both pages from the prefix
    assert again.returncode == 0, again.stderr
    assert again.stdout == added.stdout and "'page': '2'" in again.stdout
