"""Redaction at capture: secrets become keyed-hash tokens before they reach a span or disk.

Names match exactly or by glob (``x-*-token``), never by substring. A redacted value becomes
``redacted:<hmac>``: with ``TIMETRACER_REDACTION_KEY`` set, equal secrets give equal tokens
across runs; without it the key is random per process (equal within one recording)::

    >>> r = Redactor()
    >>> r.headers([("Authorization", "Bearer abc"), ("Accept", "*/*")])
    [('Authorization', 'redacted:...'), ('Accept', '*/*')]
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-amz-security-token",
    "x-csrf-token",
    "x-xsrf-token",
)
SECRET_PARAMS = (
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "key",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "sig",
)


class _NameSet:
    """Exact names in a set (O(1)), glob patterns checked one by one."""

    def __init__(self, names: Iterable[str]) -> None:
        names = [n.lower() for n in names]
        self.exact = frozenset(n for n in names if not any(c in n for c in "*?["))
        self.globs = tuple(n for n in names if n not in self.exact)

    def __contains__(self, name: str) -> bool:
        name = name.lower()
        return name in self.exact or any(fnmatch.fnmatchcase(name, g) for g in self.globs)


def _extra(var: str) -> list[str]:
    return [n.strip() for n in os.environ.get(var, "").split(",") if n.strip()]


class Redactor:
    """Replaces secret values with match-preserving tokens."""

    def __init__(
        self,
        *,
        headers: Iterable[str] = (),
        params: Iterable[str] = (),
        key: bytes | None = None,
    ) -> None:
        env_key = os.environ.get("TIMETRACER_REDACTION_KEY")
        self.key = key or (env_key.encode() if env_key else secrets.token_bytes(32))
        self.shared_key = key is not None or bool(env_key)
        self.header_names = _NameSet([*SECRET_HEADERS, *headers, *_extra("TIMETRACER_REDACT_HEADERS")])
        self.param_names = _NameSet([*SECRET_PARAMS, *params, *_extra("TIMETRACER_REDACT_PARAMS")])

    def token(self, value: str | bytes) -> str:
        data = value.encode() if isinstance(value, str) else value
        return "redacted:" + hmac.new(self.key, data, hashlib.sha256).hexdigest()[:16]

    def headers(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(k, self.header(k, v)) for k, v in pairs]

    def header(self, name: str, value: str) -> str:
        if name not in self.header_names:
            return value
        lower = name.lower()
        if lower == "cookie":  # keep the cookie names, so the app still finds its cookies
            return "; ".join(self._cookie(c) for c in value.split("; "))
        if lower == "set-cookie":  # the value goes; name and attributes (Path, Expires) stay
            first, sep, attrs = value.partition(";")
            return self._cookie(first) + sep + attrs
        return self.token(value)

    def _cookie(self, pair: str) -> str:
        name, sep, value = pair.partition("=")
        return f"{name}={self.token(value)}" if sep else self.token(pair)

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, password = userinfo.partition(":")
            netloc = f"{user}:{self.token(password)}@{hostport}" if sep else netloc
        if not parts.query and netloc == parts.netloc:
            return url
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if not any(k in self.param_names for k, _ in pairs) and netloc == parts.netloc:
            return url
        query = urlencode([(k, self.token(v) if k in self.param_names else v) for k, v in pairs])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_default: Redactor | None = None


def default_redactor() -> Redactor:
    global _default
    if _default is None:
        _default = Redactor()
    return _default


def set_default_redactor(redactor: Redactor | None) -> None:
    global _default
    _default = redactor
