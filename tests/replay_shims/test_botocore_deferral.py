"""boto3 calls left to the writer: the cassette holds what a capture on the request path would
have put on the span (sends, redacted headers and bodies, errors, their types), and it
replays offline; against a real moto server on 127.0.0.1."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import httpx
import pytest
from botocore.config import Config

from tests.deferral import interactions_of, left_to_writer, recorded_both_ways
from tests.upstream_app import app

# A secret the app's redactor learns from a header, then finds in an object it stores.
SECRET = "s3cr3t-0123456789abcdef"


def _s3(endpoint: str | None = None) -> Any:
    return boto3.client("s3", endpoint_url=endpoint,
                        config=Config(retries={"total_max_attempts": 1}, connect_timeout=2))


def _job(s3: Any, bucket: str, note: str) -> list[Any]:
    """An upload and its answer (a JSON object with a field named like a secret, and the
    learned secret in its text), a head, a listing, and an error the server sends."""
    doc = json.dumps({"user": "u", "password": "hunter2-hunter2", "note": note}).encode()
    got = [s3.put_object(Bucket=bucket, Key="d.json", Body=doc)["ETag"]]
    answer = s3.get_object(Bucket=bucket, Key="d.json")
    got += [answer["Body"].read(), answer["ContentLength"],
            s3.head_object(Bucket=bucket, Key="d.json")["ContentType"],
            [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]]
    try:
        s3.get_object(Bucket=bucket, Key="missing")
    except botocore.exceptions.ClientError as exc:
        got.append((type(exc), exc.response["Error"]["Code"], str(exc)))
    return got


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_calls_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    def job(base: str, down: str) -> None:
        httpx.get(f"{base}/blob", headers={"Authorization": f"Bearer {SECRET}"})
        _job(_s3(), bucket, f"token {SECRET}")

    calls = interactions_of(job, serve(app).url, tmp_path)
    recorded = recorded_both_ways(job, serve(app).url, calls, tmp_path, monkeypatch, fmt)
    assert {r[0] for r in recorded} == {"httpx", "botocore"}
    text = repr(recorded)
    # The object's secret field and the learned secret are tokens, in the upload kept in the
    # key and in the answer's bytes, both ways (recorded_both_ways looked for the secrets).
    assert "hunter2" not in text and "token redacted:" in text


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_calls_left_to_the_writer_replay_offline(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    port = int(endpoint.rsplit(":", 1)[1])

    def job(to: int) -> list[Any]:
        return _job(_s3(f"http://127.0.0.1:{to}"), bucket, "plain")

    live, replayed = left_to_writer(monkeypatch, tmp_path, writer, "botocore", "s3.PutObject",
                                    job, port)
    assert issubclass(live[-1][0], botocore.exceptions.ClientError) and live[-1][1] == "NoSuchKey"
    # The object as stored: its secret field a token, its length the stored body's.
    assert json.loads(replayed[1])["password"].startswith("redacted:")
    assert replayed[2] == len(replayed[1]) and type(replayed[2]) is int
    assert [(type(x), x) for x in replayed[3:]] == [(type(x), x) for x in live[3:]]
    assert replayed[0] == live[0]
