"""boto3/botocore against a real moto server on 127.0.0.1: S3, DynamoDB and Secrets Manager
calls recorded, then replayed with every socket connect refused and no credentials; values
compared with their types (StreamingBody, tz-aware datetimes, ClientError codes)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import urllib3
from botocore.config import Config
from botocore.response import StreamingBody

import timetracer_otel
from tests.conftest import connects_refused, plain_env, timetracer_cli, unreachable_port
from timetracer_otel.cassette import load_cassette

_NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def typed(value: Any) -> Any:
    """``value`` with the type of every part beside it; a StreamingBody as its type and bytes,
    response metadata (request ids, dates of the run) left out."""
    if isinstance(value, dict):
        return ("dict", sorted((k, typed(v)) for k, v in value.items() if k != "ResponseMetadata"))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, StreamingBody):
        return (type(value).__name__, value.read())
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat(), type(value.tzinfo).__name__)
    return (type(value).__name__, repr(value))


def s3_job(bucket: str) -> list[Any]:
    s3 = boto3.client("s3", config=Config(retries={"total_max_attempts": 1}))
    out: list[Any] = [
        s3.put_object(Bucket=bucket, Key="a/1.bin", Body=b"\x00\xffdata" * 300,
                      ContentType="application/octet-stream")["ETag"],
        s3.get_object(Bucket=bucket, Key="a/1.bin"),
        s3.head_object(Bucket=bucket, Key="a/1.bin")["LastModified"],
        s3.list_objects_v2(Bucket=bucket, Prefix="a/"),
    ]
    try:
        s3.get_object(Bucket=bucket, Key="missing")
    except botocore.exceptions.ClientError as exc:
        out.append((type(exc).__name__, exc.response["Error"]["Code"], str(exc)))
    try:
        s3.head_object(Bucket=bucket, Key="missing")
    except botocore.exceptions.ClientError as exc:
        out.append((exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"]))
    return out


def test_s3_calls_replay_with_their_types_offline(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = s3_job(bucket)
    live_typed = typed(live)
    assert isinstance(live[1]["Body"], StreamingBody)
    assert live[4][:2] == ("NoSuchKey", "NoSuchKey") and live[5] == ("404", 404)
    for name in _NO_CREDENTIALS:  # replay signs nothing: no credentials needed
        monkeypatch.delenv(name, raising=False)
    # ... and asks no instance metadata service for them (a connect the list would show).
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = s3_job(bucket)
    assert attempts == []
    assert typed(replayed) == live_typed
    assert replayed[2].tzinfo is not None and type(replayed[2]) is dt.datetime
    assert rep.report.misses == [] and rep.report.unused == [] and rep.report.exact == 6
    (path,) = rec.paths
    calls = load_cassette(path).interactions
    assert [c.label.split()[0] for c in calls] == [
        "s3.PutObject", "s3.GetObject", "s3.HeadObject", "s3.ListObjectsV2", "s3.GetObject",
        "s3.HeadObject"]
    assert {c.library for c in calls} == {"botocore"}
    assert calls[0].attributes.get("rpc.system") == "aws-api"  # on the instrumentation's span


def test_dynamodb_items_and_secrets(bucket: str, tmp_path: Path) -> None:
    # (`bucket` sets up the moto endpoint and test credentials.) The secret and the table are
    # made before the recording: what keeps secrets out is the recording's own redaction.
    from boto3.dynamodb.conditions import Attr, Key

    table = f"t{uuid.uuid4().hex[:8]}"
    secret_value = "hunter2-" + uuid.uuid4().hex
    ddb = boto3.resource("dynamodb")
    ddb.create_table(TableName=table, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                     BillingMode="PAY_PER_REQUEST")
    boto3.client("secretsmanager").create_secret(Name=table, SecretString=secret_value)

    def job() -> list[Any]:
        t = boto3.resource("dynamodb").Table(table)
        secret = boto3.client("secretsmanager").get_secret_value(SecretId=table)["SecretString"]
        creds = boto3.client("sts").assume_role(RoleArn="arn:aws:iam::123456789012:role/r",
                                                RoleSessionName="job")["Credentials"]
        t.put_item(Item={"id": "1", "price": Decimal("12.50"), "tags": {"a", "b", "c", "d"},
                         "raw": b"\x01", "dsn": f"postgres://app:{secret}@db/app",
                         "password": "bcrypt$2b$12$" + table})
        return [secret, creds, t.get_item(Key={"id": "1"})["Item"],
                t.query(KeyConditionExpression=Key("id").eq("1"),
                        FilterExpression=Attr("price").gt(Decimal(10)))["Items"]]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[0] == secret_value and live[2]["price"] == Decimal("12.50")
    assert live[3] == [live[2]]
    (path,) = rec.paths
    data = Path(path).read_bytes()
    for leaked in (secret_value, live[1]["SecretAccessKey"], live[1]["SessionToken"]):
        assert leaked.encode() not in data  # redacted before it is kept
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert attempts == [] and rep.report.misses == []
    assert replayed[0].startswith("redacted:")  # the secret itself never reached the cassette
    assert replayed[1]["SessionToken"].startswith("redacted:")
    # A DynamoDB attribute named like a secret: its value a token, its typed form kept.
    assert replayed[2]["password"].startswith("redacted:")
    assert b"bcrypt$2b$12$" not in data
    item = {k: v for k, v in live[2].items() if k not in ("dsn", "password")}
    assert typed({k: v for k, v in replayed[2].items() if k not in ("dsn", "password")}) \
        == typed(item)
    assert replayed[2]["dsn"] == f"postgres://app:{replayed[0]}@db/app"  # scrubbed, still valid
    assert typed(replayed[3]) == typed([replayed[2]])  # the conditions found the recording


def test_a_connection_error_replays_as_the_same_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"http://127.0.0.1:{unreachable_port()}"

    def call() -> Any:
        s3 = boto3.client("s3", endpoint_url=url,
                          config=Config(retries={"total_max_attempts": 1}, connect_timeout=1))
        return s3.get_object(Bucket="b", Key="k")

    with timetracer_otel.record(dir=tmp_path) as rec, \
            pytest.raises(botocore.exceptions.EndpointConnectionError) as live:
        call()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths), \
            pytest.raises(botocore.exceptions.EndpointConnectionError) as replayed:
        call()
    assert attempts == [] and str(replayed.value) == str(live.value)
    assert replayed.value.kwargs["endpoint_url"] == live.value.kwargs["endpoint_url"]
    assert sorted(replayed.value.kwargs) == sorted(live.value.kwargs)
    # The nested error is urllib3's again, with its message (its socket is not kept).
    nested, live_nested = replayed.value.kwargs["error"], live.value.kwargs["error"]
    assert type(live_nested) is urllib3.exceptions.NewConnectionError
    assert type(nested) is type(live_nested) and str(nested) == str(live_nested)
    assert nested.args == live_nested.args and nested.conn is None


def test_recorded_and_replayed_through_the_cli(bucket: str, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import os, boto3\n"
        "s3 = boto3.client('s3')\n"
        "b = os.environ['BUCKET']\n"
        "s3.put_object(Bucket=b, Key='k', Body=b'hello')\n"
        "print(s3.get_object(Bucket=b, Key='k')['Body'].read(), "
        "sorted(o['Key'] for o in s3.list_objects_v2(Bucket=b)['Contents']))\n")
    env = plain_env(BUCKET=bucket)
    run = [sys.executable, str(script)]
    rec = timetracer_cli("record", "--dir", str(tmp_path / "c"), "--", *run, env=env)
    assert rec.returncode == 0, rec.stderr
    assert rec.stdout == "b'hello' ['k']\n"
    for name in _NO_CREDENTIALS:
        env.pop(name, None)
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing there
    rep = timetracer_cli("replay", "--cassette", str(tmp_path / "c"), "--", *run, env=env)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout


def test_an_upload_redacted_in_its_own_bytes_replays_in_another_process(
    bucket: str, tmp_path: Path
) -> None:
    """A small JSON upload (an S3 object, a Kinesis record) with a field named like a secret
    is kept in the call's key redacted in its own bytes, with tokens of the recording
    process's redaction key (random without TIMETRACER_REDACTION_KEY); the replaying process
    makes other tokens, and still finds the calls by their exact keys."""
    script = tmp_path / "job.py"
    script.write_text(
        "import json, os, boto3\n"
        "doc = json.dumps({'user': 'u', 'password': 'pw-4e2a9c7b1d'}).encode()\n"
        "s3, kinesis = boto3.client('s3'), boto3.client('kinesis')\n"
        "print(s3.put_object(Bucket=os.environ['BUCKET'], Key='u.json', Body=doc)['ETag'])\n"
        "kinesis.create_stream(StreamName='s', ShardCount=1)\n"
        "print(kinesis.put_record(StreamName='s', Data=doc, PartitionKey='u')['ShardId'])\n")
    env = plain_env(BUCKET=bucket)
    env.pop("TIMETRACER_REDACTION_KEY", None)
    run = [sys.executable, str(script)]
    rec = timetracer_cli("record", "--dir", str(tmp_path / "c"), "--", *run, env=env)
    assert rec.returncode == 0, rec.stderr
    assert len(rec.stdout.splitlines()) == 2
    stored = b"".join(p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert b"pw-4e2a9c7b1d" not in stored and b"redacted:" in stored
    for name in _NO_CREDENTIALS:
        env.pop(name, None)
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing there
    rep = timetracer_cli("replay", "--strict", "--cassette", str(tmp_path / "c"), "--", *run,
                        env=env)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout


def test_the_apps_json_inside_message_bodies_and_base64_records_is_redacted(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SQS message body that is JSON text, and a Kinesis record's bytes (JSON, carried as
    base64 text in the answer), are the app's data: a field named like a secret in them is
    redacted, in the request kept in the key and in the answer, as in an S3 object; the
    replay gives the values with their types (str, bytes) and the rest of them as they were."""
    # One secret each: a secret found in one is scrubbed from the whole cassette.
    message = {"user": "u", "password": "pw-8d3f1a6c2e", "n": 7}
    record = {"user": "u", "password": "pw-1b7e5d9a4c", "n": 7}
    sqs, kinesis = boto3.client("sqs"), boto3.client("kinesis")
    queue = sqs.create_queue(QueueName=f"q{uuid.uuid4().hex[:8]}")["QueueUrl"]
    stream = f"s{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    shard = kinesis.describe_stream(StreamName=stream)["StreamDescription"]["Shards"][0]["ShardId"]

    def job() -> list[Any]:
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(message))
        body = sqs.receive_message(QueueUrl=queue)["Messages"][0]["Body"]
        kinesis.put_record(StreamName=stream, Data=json.dumps(record).encode(), PartitionKey="u")
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard,
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        data = kinesis.get_records(ShardIterator=it)["Records"][0]["Data"]
        return [body, data]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live == [json.dumps(message), json.dumps(record).encode()]
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"pw-8d3f1a6c2e" not in stored and b"pw-1b7e5d9a4c" not in stored
    assert base64.b64encode(json.dumps(record).encode()) not in stored  # (the record as it came)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert attempts == [] and rep.report.exact == 5
    assert [type(v) for v in replayed] == [str, bytes]
    for value in replayed:
        got = json.loads(value)
        assert got["password"].startswith("redacted:")
        assert {k: v for k, v in got.items() if k != "password"} == {"user": "u", "n": 7}


def select_job(bucket: str) -> list[Any]:
    """S3 Select: an event stream (``EventStream``: records, stats and end events, each a
    dict with the record bytes) read event by event, as an app reads Bedrock's or Kinesis'."""
    s3 = boto3.client("s3", config=Config(retries={"total_max_attempts": 1}))
    response = s3.select_object_content(
        Bucket=bucket, Key="rows.csv", Expression="SELECT * FROM S3Object", ExpressionType="SQL",
        InputSerialization={"CSV": {"FileHeaderInfo": "USE"}}, OutputSerialization={"JSON": {}})
    events = response["Payload"]
    out: list[Any] = [type(events).__name__]
    for event in events:
        out.append(typed(event))
        if "Records" in event:
            out.append(event["Records"]["Payload"])
    return out


def test_an_event_stream_replays_event_by_event(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key="rows.csv", Body=b"name,n\nada,1\nbob,2\n")
    plain = select_job(bucket)
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = select_job(bucket)
    # ["EventStream", Records event, its payload bytes, Stats event, End event]
    assert plain[0] == "EventStream" and len(plain) == 5
    assert [event[1][0][0] for event in (plain[1], plain[3], plain[4])] == ["Records", "Stats", "End"]
    assert plain[2].startswith(b'{"name":"ada","n":"1"}\n{"name":"bob","n":"2"}\n')
    assert recorded == plain
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = select_job(bucket)
    assert attempts == [] and replayed == plain and rep.report.exact == 1


def _stored_sends(paths: list[Path]) -> list[dict[str, Any]]:
    (path,) = paths
    (call,) = [c for c in load_cassette(path).interactions if c.label.startswith("s3.GetObject")]
    sends: list[dict[str, Any]] = call.response["sends"]
    return sends


def _big_object(bucket: str) -> tuple[Any, bytes]:
    """An S3 client and the 3 MiB stored at ``big.bin``: past what is read whole while
    recording."""
    data = uuid.uuid4().bytes * (3 * 65536)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    return s3, data


def test_a_large_object_read_in_parts_is_kept_whole_and_replays_with_its_type(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3, data = _big_object(bucket)

    with timetracer_otel.record(dir=tmp_path) as rec:
        body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"]
        first = body.read(1000)
        rest = b"".join(body.iter_chunks(256 * 1024))
    assert first + rest == data
    (send,) = _stored_sends(rec.paths)
    assert send["body"] == data and "body_open" not in send
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = boto3.client("s3").get_object(Bucket=bucket, Key="big.bin")["Body"]
        assert type(replayed) is type(body)
        assert replayed.read(1000) == first
        assert b"".join(replayed.iter_chunks(256 * 1024)) == rest
    assert attempts == [] and rep.report.exact == 1


def test_a_large_object_read_part_way_keeps_only_what_was_read(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is not read whole while recording: the cassette holds the bytes the app
    read before it closed the body, and a replay that reads further is refused clearly."""
    s3, data = _big_object(bucket)
    with timetracer_otel.record(dir=tmp_path) as rec:
        body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"]
        first = body.read(4096)
        body.close()
    assert first == data[:4096]
    (send,) = _stored_sends(rec.paths)
    assert send["body"] == first and send["body_open"] is True
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    from timetracer_otel.errors import ReplayUnsupportedError

    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = boto3.client("s3").get_object(Bucket=bucket, Key="big.bin")["Body"]
        assert isinstance(replayed, StreamingBody)
        assert replayed.read(4096) == first
        with pytest.raises(ReplayUnsupportedError, match="where the app stopped reading"):
            replayed.read(10)
        with pytest.raises(ReplayUnsupportedError, match="where the app stopped reading"):
            replayed.read()  # (not the kept bytes as if they were the rest of the object)
    assert attempts == []


def test_a_large_text_object_read_line_by_line_keeps_every_line(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``with body as f: for line in f`` reads botocore's raw stream itself."""
    data = b"".join(b"line %07d\n" % i for i in range(200_000))  # 2.6 MB
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="big.txt", Body=data)

    def job() -> tuple[int, bytes, bytes]:
        with boto3.client("s3").get_object(Bucket=bucket, Key="big.txt")["Body"] as f:
            lines = list(f)
        with boto3.client("s3").get_object(Bucket=bucket, Key="big.txt")["Body"] as f:
            first, rest = f.readline(), f.read()
        return len(lines), lines[0] + lines[-1], first + rest

    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    assert recorded == (200_000, b"line 0000000\nline 0199999\n", data)
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = job()
    assert attempts == [] and replayed == recorded


def test_an_object_still_unread_when_the_recording_ends_is_kept_as_read_so_far(
    bucket: str, tmp_path: Path
) -> None:
    s3, data = _big_object(bucket)
    with timetracer_otel.record(dir=tmp_path) as rec:
        body = s3.get_object(Bucket=bucket, Key="big.bin")["Body"]
        first = body.read(100)
    assert first + body.read() == data  # the app reads on after the recording
    (send,) = _stored_sends(rec.paths)
    assert send["body"] == first and send["body_open"] is True


def test_an_event_stream_call_ends_with_its_last_event(bucket: str, tmp_path: Path) -> None:
    """An event stream reaches the app as it comes: its call (span and payload) ends when the
    app has read the stream, with every event's bytes kept, not when the headers came."""
    boto3.client("s3").put_object(Bucket=bucket, Key="rows.csv", Body=b"name,n\nada,1\n")
    with timetracer_otel.record(dir=tmp_path) as rec:
        s3 = boto3.client("s3")
        events = s3.select_object_content(
            Bucket=bucket, Key="rows.csv", Expression="SELECT * FROM S3Object",
            ExpressionType="SQL", InputSerialization={"CSV": {"FileHeaderInfo": "USE"}},
            OutputSerialization={"JSON": {}})["Payload"]
        time.sleep(0.3)
        kinds = [next(iter(event)) for event in events]
    assert kinds == ["Records", "Stats", "End"]
    (path,) = rec.paths
    (call,) = load_cassette(path).interactions
    (send,) = call.response["sends"]
    # kept as its three messages, unframed (framed again at replay), nothing after them
    assert "body_open" not in send and len(send["messages"]) == 3 and send["body"] == b""
    assert call.end_ns - call.start_ns >= 300_000_000


def test_a_secret_in_a_gzip_object_read_part_way_is_redacted(bucket: str, tmp_path: Path) -> None:
    """An object stored gzip-encoded and read only in part: its cut stream is unpacked as far
    as it goes, and a secret the run learned is replaced inside before it is stored."""
    import gzip
    import zlib

    secret = f"sk-{uuid.uuid4().hex}"
    boto3.client("secretsmanager").create_secret(Name=f"s-{bucket}", SecretString=secret)
    lines = b'{"key": "%s"}\n' % secret.encode() + b"".join(
        b'{"row": "%s"}\n' % uuid.uuid4().hex.encode() for _ in range(60_000))
    packed = gzip.compress(lines, mtime=0)  # ~2.4 MB: streamed, not read whole
    assert len(packed) > (1 << 20)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="rows.json.gz", Body=packed, ContentEncoding="gzip")
    with timetracer_otel.record(dir=tmp_path) as rec:
        assert boto3.client("secretsmanager").get_secret_value(
            SecretId=f"s-{bucket}")["SecretString"] == secret
        body = s3.get_object(Bucket=bucket, Key="rows.json.gz")["Body"]
        head = body.read(65536)
        body.close()
    assert head == packed[:65536]
    (path,) = rec.paths
    (send,) = _stored_sends(rec.paths)
    assert send["body_open"] is True
    inside = zlib.decompressobj(wbits=31).decompress(send["body"])
    assert secret.encode() not in inside and inside.startswith(b'{"key": "redacted:')
    assert secret.encode() not in Path(path).read_bytes()


def test_an_object_packed_twice_is_redacted_inside(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ContentEncoding="gzip, br"`` (gzip, then brotli): unpacked in reverse, its secret
    field replaced, packed again in order; a replay hands back the same codings."""
    import gzip

    import brotli

    doc = {"access_token": f"at-{uuid.uuid4().hex}", "n": 1}
    packed = brotli.compress(gzip.compress(json.dumps(doc).encode(), mtime=0))
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="doc.json", Body=packed, ContentType="application/json",
                  ContentEncoding="gzip, br")
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = s3.get_object(Bucket=bucket, Key="doc.json")
        live_body = live["Body"].read()
    assert live_body == packed and live["ContentEncoding"] == "gzip, br"
    (path,) = rec.paths
    assert doc["access_token"].encode() not in Path(path).read_bytes()
    (send,) = _stored_sends(rec.paths)
    inside = json.loads(gzip.decompress(brotli.decompress(send["body"])))
    assert inside["access_token"].startswith("redacted:") and inside["n"] == 1
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = boto3.client("s3").get_object(Bucket=bucket, Key="doc.json")
        assert replayed["Body"].read() == send["body"]
    assert attempts == [] and replayed["ContentEncoding"] == "gzip, br"


def test_a_body_read_from_memory_takes_a_socket_timeout(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``StreamingBody.set_socket_timeout`` reaches through to a socket: a body read whole
    while recording, and every replayed one, has one whose timeout changes nothing."""
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="small.bin", Body=b"x" * 100)

    def job() -> bytes:
        body = boto3.client("s3").get_object(Bucket=bucket, Key="small.bin")["Body"]
        body.set_socket_timeout(5)
        data: bytes = body.read()
        return data

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job() == b"x" * 100
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        assert job() == b"x" * 100
    assert attempts == []


def test_a_gzip_object_iterated_by_lines_gives_its_lines_as_urllib3_decodes_them(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``with body as f: for line in f`` iterates urllib3's response, which decodes a
    ``Content-Encoding`` there (and nowhere else botocore reads): the same lines under
    record and in a replay, for a body read whole and for one kept as it is read."""
    import gzip

    small = b"alpha\rbeta\ngamma\r\ndelta\n"
    big = b"".join(b"row %07d %s\n" % (i, uuid.uuid4().hex.encode())
                   for i in range(100_000))  # 4.5 MB, ~2.3 MB packed: kept as it is read
    s3 = boto3.client("s3")
    for key, data in (("small.gz", small), ("big.gz", big)):
        s3.put_object(Bucket=bucket, Key=key, Body=gzip.compress(data, mtime=0),
                      ContentEncoding="gzip")

    def job() -> list[tuple[int, bytes, bytes]]:
        out = []
        for key in ("small.gz", "big.gz"):
            with boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"] as f:
                lines = list(f)
            out.append((len(lines), lines[0], lines[-1]))
        return out

    live = job()
    assert live == [(3, b"alpha\rbeta\n", b"delta\n"),
                    (100_000, big[:big.index(b"\n") + 1], big[big.rindex(b"\n", 0, -1) + 1:])]
    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job() == live
    for name in _NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        assert job() == live
    assert attempts == []
