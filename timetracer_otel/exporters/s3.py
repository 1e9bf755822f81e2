"""Cassettes in an S3-compatible bucket: ``--dir s3://bucket/prefix`` or ``TIMETRACER_DIR``.

    >>> storage = S3Storage("s3://recordings/nightly")
    >>> storage.write("2026-11-26/GET__users__4bf92f35.msgpack", data)
    's3://recordings/nightly/2026-11-26/GET__users__4bf92f35.msgpack'

boto3 finds credentials, region and endpoint the usual way (``AWS_*`` variables, profiles;
``AWS_ENDPOINT_URL`` points it at MinIO, moto or another S3-compatible server). Every call runs
under ``suppress_instrumentation``, so the writer's own S3 traffic never becomes a span and is
never recorded or replayed. One ``put_object`` per cassette: S3 writes are atomic.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation

from timetracer_otel.errors import CassetteError, ConfigError, TimetracerError, without_passwords

SUFFIXES = (".msgpack", ".json")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → (``bucket``, ``a/b``)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r} is not an s3:// location; use s3://bucket/prefix.")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"{url!r} names no bucket; use s3://bucket/prefix.")
    return bucket, key.strip("/")


def _reason(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        return without_passwords(
            f"{err.get('Code', '?')}: {err.get('Message', '') or 'no message'}".rstrip(": "))
    return without_passwords(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__


class S3Storage:
    """Writes, lists and reads cassettes below ``s3://bucket/prefix``."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                raise ConfigError(
                    "s3:// locations need boto3; pip install boto3 (or 'timetracer-otel[botocore]')."
                ) from None
            with suppress_instrumentation():
                self._client = boto3.client("s3")
        return self._client

    def key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def write(self, relpath: str, data: bytes) -> str:
        key = self.key(relpath)
        with suppress_instrumentation():
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
            except Exception as exc:
                raise CassetteError(
                    f"cannot write s3://{self.bucket}/{key} ({_reason(exc)}); check the bucket and "
                    "credentials."
                ) from None
        return f"s3://{self.bucket}/{key}"

    def check(self) -> None:
        with suppress_instrumentation():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except TimetracerError:
                raise
            except Exception as exc:
                raise CassetteError(
                    f"cannot use s3://{self.bucket} for cassettes ({_reason(exc)}); check the bucket "
                    "name, AWS credentials and AWS_ENDPOINT_URL."
                ) from None

    def list(self) -> list[str]:
        """Every cassette below the prefix, as sorted ``s3://`` URLs."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with suppress_instrumentation():
            try:
                pages = self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix)
                for page in pages:
                    for obj in page.get("Contents", []):
                        key = obj["Key"]
                        name = key.rsplit("/", 1)[-1]
                        if key.endswith(SUFFIXES) and not name.startswith("."):
                            keys.append(key)
            except Exception as exc:
                raise CassetteError(
                    f"cannot list s3://{self.bucket}/{prefix} ({_reason(exc)}); check the bucket and "
                    "credentials."
                ) from None
        return [f"s3://{self.bucket}/{k}" for k in sorted(keys)]

    def read(self, url: str) -> bytes:
        """The bytes of the object at ``url`` (an ``s3://`` URL in this bucket)."""
        bucket, key = parse_s3_url(url)
        with suppress_instrumentation():
            try:
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                data: bytes = body.read()
                return data
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    raise CassetteError(f"{url}: no such cassette; check the path.") from None
                raise CassetteError(f"cannot read {url} ({_reason(exc)}).") from None

    def read_tagged(self, url: str) -> tuple[bytes, str]:
        """The bytes of the object at ``url`` and their ETag, for :meth:`replace`."""
        bucket, key = parse_s3_url(url)
        with suppress_instrumentation():
            try:
                got = self.client.get_object(Bucket=bucket, Key=key)
                data: bytes = got["Body"].read()
                return data, str(got["ETag"])
            except Exception as exc:
                raise CassetteError(f"cannot read {url} ({_reason(exc)}).") from None

    def replace(self, url: str, data: bytes, etag: str) -> bool:
        """Overwrite the object at ``url`` only if it is still the one read with ``etag``
        (a conditional write); False when another writer replaced it meanwhile. A store that
        ignores ``If-Match`` keeps the last write."""
        bucket, key = parse_s3_url(url)
        with suppress_instrumentation():
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)
                return True
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise CassetteError(
                    f"cannot write {url} ({_reason(exc)}); check the bucket and credentials."
                ) from None

    def exists(self, url: str) -> bool:
        bucket, key = parse_s3_url(url)
        with suppress_instrumentation():
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NotFound"):
                    return False
                raise CassetteError(f"cannot read {url} ({_reason(exc)}).") from None

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"
