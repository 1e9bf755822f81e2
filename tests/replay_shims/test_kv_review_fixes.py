"""Review fixes for the redis and botocore shims, each recorded against a real server (Redis
on 127.0.0.1:6379, database 13; a moto server) and replayed with every connect refused:

- redis-py's server errors keep the ``status_code`` it gives them (``NOSCRIPT``, ``ERR``...);
- ``generate_presigned_url``/``generate_presigned_post`` work in a replay without credentials;
- a miss sent in a replay without credentials raises ``NoCredentialsError`` (the placeholder
  credentials presign only);
- an S3 object body or a DynamoDB item gets the built-in secret names (``password``...) and
  the user's own rules, and secrets learned elsewhere, replaced in its own bytes (whitespace
  kept, ``ContentLength`` the body's length; gzip and deflate inside); a DynamoDB number stays
  a number under a built-in name;
- ``EndpointConnectionError.kwargs["error"]`` replays as urllib3's ``NewConnectionError``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import uuid
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
import redis
import redis.asyncio
from botocore.config import Config
from botocore.response import StreamingBody

import timetracer_otel
from tests.conftest import REDIS_PORT, SHARED_SERVICES, connects_refused, unreachable_port
from timetracer_otel import redaction
from timetracer_otel.replay_shims import botocore as boto_shim
from timetracer_otel.replay_shims import redis as redis_shim
from timetracer_otel.replay_shims.base import STATE, error_tree, rebuild_error

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

DB = 13  # the only Redis database these tests touch


# --- redis: server errors keep redis-py's attributes --------------------------------------


@pytest.fixture
def keys() -> Iterator[str]:
    """A fresh key prefix in Redis database 13; its keys are deleted afterwards."""
    try:
        admin = redis.Redis(port=REDIS_PORT, db=DB)
        admin.ping()
    except redis.ConnectionError as exc:  # fail, naming the service: never skip silently
        pytest.fail(f"Redis is needed on 127.0.0.1:{REDIS_PORT} and is not reachable: {exc}")
    name = f"ttkv:{uuid.uuid4().hex[:10]}:"
    yield name
    found = admin.keys(name + "*")
    if found:
        admin.delete(*found)
    admin.close()


def described(exc: BaseException) -> tuple[Any, ...]:
    """An exception as its class, args and every attribute redis-py set (status_code...)."""
    return (type(exc), exc.args, sorted((k, type(v), v) for k, v in vars(exc).items()))


def redis_errors(port: int, p: str) -> list[Any]:
    r: Any = redis.Redis(port=port, db=DB, socket_connect_timeout=1)
    out: list[Any] = []
    calls: list[Callable[[], Any]] = [lambda: r.evalsha("0" * 40, 0),
                                      lambda: r.execute_command("NOSUCHCMD"),
                                      lambda: r.lpush(p + "s", "x")]
    for call in calls:
        r.set(p + "s", "v")
        try:
            call()
        except redis.ResponseError as exc:
            out.append(described(exc))
    pipe: Any = r.pipeline()  # MULTI: the queued error, then EXECABORT
    pipe.set(p + "t", 1).execute_command("NOSUCHCMD")
    try:
        pipe.execute()
    except redis.ResponseError as exc:
        out.append(described(exc))
    pipe = r.pipeline(transaction=False)  # the error returned in place
    pipe.set(p + "t", 1).lpush(p + "s", "x").get(p + "t")
    out.append([described(v) if isinstance(v, BaseException) else (type(v), v)
                for v in pipe.execute(raise_on_error=False)])
    r.close()
    dead = redis.Redis(port=unreachable_port(), db=DB, socket_connect_timeout=0.5)
    try:
        dead.get(p + "x")
    except redis.ConnectionError as exc:  # no server answer: no status code, network type
        out.append((type(exc), exc.status_code, exc.error_type))
    return out


async def async_redis_errors(port: int) -> list[Any]:
    r = redis.asyncio.Redis(port=port, db=DB, protocol=3, decode_responses=True)
    out: list[Any] = []
    try:
        await r.evalsha("0" * 40, 0)
    except redis.exceptions.NoScriptError as exc:
        out.append(described(exc))
    await r.aclose()
    return out


def test_redis_server_errors_replay_with_their_status_code(keys: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = redis_errors(REDIS_PORT, keys)
        live_async = asyncio.run(async_redis_errors(REDIS_PORT))
    codes = [e[2] for e in live[:4]]
    assert [dict((k, v) for k, _, v in c)["status_code"] for c in codes] == [
        "NOSCRIPT", "ERR", None, "ERR"]  # (redis-py gives WRONGTYPE no code)
    assert live[0][0] is redis.exceptions.NoScriptError
    assert dict((k, v) for k, _, v in live_async[0][2])["status_code"] == "NOSCRIPT"
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = redis_errors(unreachable_port(), keys)
        replayed_async = asyncio.run(async_redis_errors(unreachable_port()))
    assert attempts == [] and rep.report.misses == []
    assert replayed == live  # classes, args, status_code and error_type, value and type
    assert replayed_async == live_async
    assert live[-1][:2] == (redis.ConnectionError, None)


def test_a_redis_error_recorded_without_its_attributes_still_replays() -> None:
    """A cassette from before the attributes were kept: ``cls(*args)``, as it was then."""
    exc = redis.exceptions.NoScriptError("No matching script.", status_code="NOSCRIPT")
    old = error_tree(exc)  # attrs None
    rebuilt = rebuild_error(old, redis_shim._build_error)
    assert type(rebuilt) is redis.exceptions.NoScriptError
    assert rebuilt.args == ("No matching script.",) and rebuilt.status_code is None
    new = rebuild_error(redis_shim._error_tree(exc), redis_shim._build_error)
    assert type(new) is redis.exceptions.NoScriptError and new.status_code == "NOSCRIPT"


# --- botocore: presigned URLs and POSTs in a replay without credentials --------------------

_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def presign(bucket: str) -> list[Any]:
    # (a session of its own: boto3's default one keeps the credentials it resolved once)
    s3 = boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))
    s3.head_bucket(Bucket=bucket)  # a recorded call beside them
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "a b.txt"},
                                    ExpiresIn=600)
    post = s3.generate_presigned_post(bucket, "up/${filename}", ExpiresIn=600)
    return [url, post]


def test_presigned_urls_and_posts_are_built_in_a_replay_without_credentials(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live_url, live_post = presign(bucket)
    for name in _CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        url, post = presign(bucket)
    assert attempts == [] and rep.report.misses == [] and rep.report.exact == 1
    assert type(url) is str and type(post) is dict
    # The same URL but for the signature, its date and the placeholder credential.
    assert url.split("?")[0] == live_url.split("?")[0]
    assert f"X-Amz-Credential={boto_shim.PLACEHOLDER_ACCESS_KEY}%2F" in url
    assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url
    assert post["url"] == live_post["url"] and sorted(post["fields"]) == sorted(live_post["fields"])
    assert post["fields"]["x-amz-credential"].startswith(boto_shim.PLACEHOLDER_ACCESS_KEY + "/")
    assert all(type(v) is str for v in post["fields"].values())


@pytest.mark.parametrize("on_miss", ["passthrough", "record"])
def test_a_miss_sent_in_a_replay_without_credentials_is_not_signed_with_the_placeholder(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_miss: str
) -> None:
    """The placeholder credentials presign only: a request really sent raises
    NoCredentialsError as live does, before it is sent (nothing reaches AWS, no 403 kept)."""
    with timetracer_otel.record(dir=tmp_path / "c") as rec:
        presign(bucket)
    for name in _CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    s3 = boto3.session.Session().client("s3")
    with pytest.raises(botocore.exceptions.NoCredentialsError):
        s3.list_objects_v2(Bucket=bucket)  # live, without credentials
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, on_miss=on_miss):
        url, post = presign(bucket)  # recorded, and presigned with the placeholder
        with pytest.raises(botocore.exceptions.NoCredentialsError):
            s3.list_objects_v2(Bucket=bucket)  # a miss, sent: unsigned, as live
    assert attempts == []
    assert boto_shim.PLACEHOLDER_ACCESS_KEY in url
    assert post["fields"]["x-amz-credential"].startswith(boto_shim.PLACEHOLDER_ACCESS_KEY)
    kept = b"".join(Path(p).read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert boto_shim.PLACEHOLDER_ACCESS_KEY.encode() not in kept


# --- botocore: the app's data (S3 objects, DynamoDB items) --------------------------------

CONFIG = b'{\n  "db_user": "app",\n  "password": "hunter2-long",\n  "api_key": "k-1"\n}\n'


def get_config(bucket: str, body: bytes, content_type: str = "application/json") -> list[Any]:
    s3 = boto3.client("s3", config=Config(retries={"total_max_attempts": 1}))
    s3.put_object(Bucket=bucket, Key="cfg.json", Body=body, ContentType=content_type)
    got = s3.get_object(Bucket=bucket, Key="cfg.json")
    assert isinstance(got["Body"], StreamingBody)
    data = got["Body"].read()
    head = s3.head_object(Bucket=bucket, Key="cfg.json")
    return [data, got["ContentLength"], type(got["ContentLength"]), got["ETag"],
            head["ContentLength"], got["ContentType"]]


def test_an_s3_json_object_with_a_password_field_is_redacted_in_its_own_bytes(
    bucket: str, tmp_path: Path
) -> None:
    """The built-in secret names apply to the app's data too (principle 7), replaced in the
    object's own bytes: whitespace and order kept, ContentLength the stored body's length."""
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = get_config(bucket, CONFIG)
    assert live[0] == CONFIG and live[1] == len(CONFIG)
    assert live[3].strip('"') == hashlib.md5(CONFIG).hexdigest()
    (path,) = rec.paths
    stored = Path(path).read_bytes()
    assert b"hunter2-long" not in stored and b'"k-1"' not in stored  # (the upload's key too)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = get_config(bucket, CONFIG)
    assert attempts == [] and rep.report.misses == [] and rep.report.shape_matches == []
    data = replayed[0]
    password, api_key = json.loads(data)["password"], json.loads(data)["api_key"]
    assert password.startswith("redacted:") and api_key.startswith("redacted:")
    assert data == CONFIG.replace(b"hunter2-long", password.encode()).replace(
        b'"k-1"', json.dumps(api_key).encode())  # the rest byte for byte
    assert replayed[1] == len(data) and replayed[2] is int
    assert replayed[3:] == live[3:]  # the ETag names the object; HEAD's length, the type


def test_a_learned_secret_in_an_s3_object_is_replaced_in_its_bytes(
    bucket: str, tmp_path: Path
) -> None:
    name = f"s{uuid.uuid4().hex[:8]}"
    secret = "pw-" + uuid.uuid4().hex
    boto3.client("secretsmanager").create_secret(Name=name, SecretString=secret)
    body = b'{\n  "dsn": "postgres://app:' + secret.encode() + b'@db/app",\n  "n": 1\n}\n'
    binary = b"\x00\xff" + secret.encode() + b"\x80\x81tail"

    def job() -> list[Any]:
        got = boto3.client("secretsmanager").get_secret_value(SecretId=name)["SecretString"]
        s3 = boto3.client("s3")
        s3.put_object(Bucket=bucket, Key="cfg.json.gz", Body=gzip.compress(body, mtime=0),
                      ContentEncoding="gzip", ContentType="application/json")
        packed = s3.get_object(Bucket=bucket, Key="cfg.json.gz")
        return [got, get_config(bucket, body), get_config(bucket, binary,
                                                          "application/octet-stream"),
                [packed["Body"].read(), packed["ContentLength"], packed["ContentEncoding"]]]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[0] == secret and live[1][0] == body
    (path,) = rec.paths
    assert secret.encode() not in Path(path).read_bytes()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert attempts == [] and rep.report.misses == []
    token = replayed[0]
    assert token.startswith("redacted:")
    text, length, length_type = replayed[1][:3]
    assert text == body.replace(secret.encode(), token.encode())  # whitespace and order kept
    assert json.loads(text)["n"] == 1 and length == len(text) and length_type is int
    data, length = replayed[2][:2]  # not UTF-8: masked to the secret's own length
    assert len(data) == len(binary) == length and data.startswith(b"\x00\xffredacted:***")
    assert data.endswith(b"\x80\x81tail")
    assert replayed[1][3] == live[1][3]  # the ETag names the object: kept
    packed, length, encoding = replayed[3]  # stored compressed: replaced inside, packed again
    assert gzip.decompress(packed) == text and length == len(packed) and encoding == "gzip"
    assert gzip.decompress(live[3][0]) == body


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(data) + packer.flush()


def test_a_learned_secret_in_a_deflate_encoded_s3_object_never_reaches_the_cassette(
    bucket: str, tmp_path: Path
) -> None:
    """deflate as HTTP sends it (zlib-wrapped or raw) is unpacked like gzip; an encoding that
    cannot be unpacked keeps its bytes, a known secret in them masked."""
    name = f"s{uuid.uuid4().hex[:8]}"
    secret = "pw-" + uuid.uuid4().hex
    boto3.client("secretsmanager").create_secret(Name=name, SecretString=secret)
    body = b'{"note": "password is ' + secret.encode() + b'", "n": 1}'
    objects = {"zlib": (zlib.compress(body), "deflate"), "raw": (raw_deflate(body), "deflate"),
               "odd": (b"\xff\x00" + body, "x-unknown")}  # (not UTF-8: masked)

    def job() -> list[Any]:
        got = boto3.client("secretsmanager").get_secret_value(SecretId=name)["SecretString"]
        s3 = boto3.client("s3")
        out: list[Any] = [got]
        for key, (data, encoding) in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=data, ContentEncoding=encoding,
                          ContentType="application/json")
            obj = s3.get_object(Bucket=bucket, Key=key)
            out.append([obj["Body"].read(), obj["ContentLength"], obj["ContentEncoding"]])
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[0] == secret
    assert [v[0] for v in live[1:]] == [v[0] for v in objects.values()]
    (path,) = rec.paths
    stored = Path(path).read_bytes()
    assert secret.encode() not in stored
    for packed in (zlib.compress(secret.encode()), raw_deflate(secret.encode())):
        assert packed[2:-4] not in stored
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert attempts == [] and rep.report.misses == []
    token = replayed[0]
    assert token.startswith("redacted:")
    text = body.replace(secret.encode(), token.encode())
    (zdata, zlen, zenc), (rdata, rlen, renc), (odata, olen, oenc) = replayed[1:]
    assert zlib.decompress(zdata) == text and zlen == len(zdata) and zenc == "deflate"
    assert zlib.decompress(rdata, -15) == text and rlen == len(rdata) and renc == "deflate"
    assert secret.encode() not in odata and len(odata) == olen == len(objects["odd"][0])
    assert oenc == "x-unknown"


def test_a_replayed_body_length_is_its_content_length_even_if_scrubbed_later() -> None:
    """A body whose stored bytes changed after its headers (a secret the writer learned
    later): botocore reports the length of the bytes it reads."""
    exchange = boto_shim._Exchange(replay=[{
        "url": "http://s3/b/k", "status": 200,
        "headers": [["Content-Length", "99"], ["Content-Type", "text/plain"]],
        "body": b"redacted:0123456789abcdef"}])
    response = exchange.answer("http://s3/b/k")
    assert response.headers["Content-Length"] == str(len(response.content)) == "25"


def dynamodb_table() -> str:
    """A new table keyed by ``id`` on the moto server (the ``bucket`` fixture's endpoint)."""
    table = f"t{uuid.uuid4().hex[:8]}"
    boto3.resource("dynamodb").create_table(
        TableName=table, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST")
    return table


def test_dynamodb_items_get_the_built_in_names_on_strings_and_user_rules_typed(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (`bucket`: the moto endpoint and test credentials.)
    table = dynamodb_table()
    ssn = "123-45-" + uuid.uuid4().hex[:6]
    item = {"id": "u1", "password": "bcrypt$2b$12$" + table, "api_key": ["k1", "k2"],
            "token": {"exp": Decimal(5)}, "secret": Decimal("7"), "ssn": ssn,
            "pin": Decimal(987654321012)}

    def job() -> list[Any]:
        t = boto3.resource("dynamodb").Table(table)
        t.put_item(Item=item)
        return [t.get_item(Key={"id": "u1"})["Item"]]

    original = STATE.redactor
    monkeypatch.setenv("TIMETRACER_REDACT", "json:**.ssn,mongo:pin")
    redaction.set_default_redactor(redaction.Redactor())
    try:
        with timetracer_otel.record(dir=tmp_path) as rec:
            live = job()
        (path,) = rec.paths
        stored = Path(path).read_bytes()
        assert ssn.encode() not in stored and b"987654321012" not in stored  # the user's rules
        assert b"bcrypt$2b$12$" not in stored and b'"k1"' not in stored  # the built-in names
        with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
            replayed = job()
    finally:
        redaction.set_default_redactor(original)
    assert attempts == [] and rep.report.misses == []
    assert live[0] == item
    got = replayed[0]
    assert got["ssn"].startswith("redacted:") and type(got["ssn"]) is str
    # A number under a rule: a string holding its token (a DynamoDB N cannot hold one).
    assert got["pin"].startswith("redacted:") and type(got["pin"]) is str
    # The built-in names (as MongoDB documents get them): strings become tokens in their
    # typed form; numbers, binaries and booleans stay as they are, so they still parse.
    assert got["password"].startswith("redacted:") and type(got["password"]) is str
    assert len(got["api_key"]) == 2 and all(
        type(v) is str and v.startswith("redacted:") for v in got["api_key"])
    assert got["token"] == {"exp": Decimal(5)} and type(got["token"]["exp"]) is Decimal
    assert got["secret"] == Decimal("7") and type(got["secret"]) is Decimal
    assert got["id"] == "u1"


# --- botocore: a connection error keeps its nested error ------------------------------------


def test_an_endpoint_connection_error_recorded_with_its_error_as_text_still_replays() -> None:
    old = error_tree(botocore.exceptions.EndpointConnectionError(endpoint_url="http://h/"),
                     {"kwargs": {"endpoint_url": "http://h/", "error": "refused"}})
    rebuilt = rebuild_error(old, boto_shim._build_error)
    assert isinstance(rebuilt, botocore.exceptions.EndpointConnectionError)
    assert type(rebuilt) is botocore.exceptions.EndpointConnectionError
    assert rebuilt.kwargs == {"endpoint_url": "http://h/", "error": "refused"}


@pytest.mark.parametrize("stored", [{}, {"ContentType": "text/plain"},
                                    {"ContentType": "application/json", "ContentEncoding": "utf-8"}],
                         ids=["default-content-type", "text-plain", "utf-8-encoding"])
def test_an_s3_json_object_is_redacted_whatever_its_content_type_says(
    bucket: str, tmp_path: Path, stored: dict[str, str]
) -> None:
    # Put outside the recording (the secret is not learned from the upload): the object's
    # JSON is found by its bytes, not by a Content-Type boto3 leaves at binary/octet-stream.
    secret = "cfg-" + uuid.uuid4().hex
    body = b'{"db": "x",\n "password": "' + secret.encode() + b'"}\n'
    boto3.client("s3").put_object(Bucket=bucket, Key="cfg", Body=body, **stored)

    def get() -> tuple[bytes, int]:
        got = boto3.client("s3").get_object(Bucket=bucket, Key="cfg")
        return got["Body"].read(), got["ContentLength"]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = get()
    assert live == (body, len(body))
    (path,) = rec.paths
    assert secret.encode() not in Path(path).read_bytes()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths):
        data, length = get()
    assert attempts == [] and length == len(data)
    assert data.startswith(b'{"db": "x",\n "password": "redacted:') and data.endswith(b'"}\n')


def test_a_dynamodb_expression_value_compared_with_a_secret_name_never_reaches_the_cassette(
    bucket: str, tmp_path: Path
) -> None:
    # (`bucket`: the moto endpoint and test credentials.) The values sit under :v0/:p, not
    # under the attribute's name: a scan that finds nothing and a conditional put would
    # otherwise keep them in their keys.
    from boto3.dynamodb.conditions import Attr

    table = dynamodb_table()
    looked_for, guarded = "scan-" + uuid.uuid4().hex, "cond-" + uuid.uuid4().hex

    def job() -> list[Any]:
        t = boto3.resource("dynamodb").Table(table)
        found = t.scan(FilterExpression=Attr("password").eq(looked_for))["Items"]
        t.put_item(Item={"id": "u1", "n": Decimal(3)},
                   ConditionExpression=Attr("password").ne(guarded))
        low = boto3.client("dynamodb").scan(
            TableName=table, FilterExpression="#p = :p AND n = :n",
            ExpressionAttributeNames={"#p": "Password"},
            ExpressionAttributeValues={":p": {"S": looked_for}, ":n": {"N": "3"}})["Items"]
        return [found, low]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live == [[], []]
    (path,) = rec.paths
    stored = Path(path).read_bytes()
    assert looked_for.encode() not in stored and guarded.encode() not in stored
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert job() == live
    assert attempts == [] and rep.report.misses == []
