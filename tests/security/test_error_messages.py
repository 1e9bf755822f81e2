"""Error messages never print a URL's password (an endpoint URL botocore quotes, a DSN)."""

from __future__ import annotations

import botocore.exceptions
import pytest

from timetracer_otel.errors import without_passwords
from timetracer_otel.exporters.s3 import _reason


@pytest.mark.parametrize(("text", "shown"), [
    ('connect to "http://user:SECRETPW123@127.0.0.1:9/bucket"', 'connect to "http://user:***@127.0.0.1:9/bucket"'),
    ("postgresql://app:p%40ss@db:5432/x failed", "postgresql://app:***@db:5432/x failed"),
    ("s3+https://k:v@h/p and https://a:b@c/", "s3+https://k:***@h/p and https://a:***@c/"),
    ("http://user@host/ has no password", "http://user@host/ has no password"),
    ("mailto-like a:b@c stays", "mailto-like a:b@c stays"),
])
def test_url_passwords_are_hidden(text: str, shown: str) -> None:
    assert without_passwords(text) == shown


def test_an_s3_connection_error_names_the_endpoint_without_its_password() -> None:
    exc = botocore.exceptions.EndpointConnectionError(
        endpoint_url="http://user:SECRETPW123@127.0.0.1:9/bucket")
    reason = _reason(exc)
    assert "SECRETPW123" not in reason and "http://user:***@127.0.0.1:9/bucket" in reason
