"""Canonical requests and the stable keys replay matches on.

A shim describes each dependency call as a :class:`Call`: the full request it will store
(a codec tree, already redacted), the fields that identify it exactly (``identity``) and the
fields that survive when volatile values are dropped (``shape``). Keys are hashes of those,
so record and replay compute the same key from the same call on any host::

    >>> call = Call("httpx", {...}, identity={"method": "GET", "url": u}, shape=...)
    >>> call.key
    'httpx:5d41402abc4b2a76b9719d911017c592'
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import msgspec

from timetracer_otel.codec import Tree
from timetracer_otel.redaction import WITHHELD

_encode_sorted = msgspec.json.Encoder(order="sorted").encode

# Redaction tokens carry a keyed hash; without a shared project key they differ between the
# recording and the replay process, so keys see every token as the same value.
_TOKEN = re.compile(r"redacted:[0-9a-f]+")
_TOKEN_BYTES = re.compile(rb"redacted:[0-9a-f]+")


# "redacted:" in base64 at each of the three places a token can start within bytes (the JSON
# of stable_hash carries bytes as base64, and an app may send base64 text): the groups of
# three bytes that hold only the token's ("redacted:", "dacted", "edacte").
_B64_0, _B64_1, _B64_2 = b"cmVkYWN0ZWQ6", b"ZGFjdGVk", b"ZWRhY3Rl"
_B64_TOKEN_TEXT = re.compile(r"cmVkYWN0ZWQ6|ZGFjdGVk|ZWRhY3Rl")


def _tokens_folded(tree: Tree) -> Tree:
    """``tree`` with the tokens inside its bytes values (an app's JSON upload redacted in its
    own bytes), and inside base64 text (a message body sent as base64 of the app's JSON),
    made one value, as the JSON text's are in :func:`stable_hash`."""
    if isinstance(tree, dict):
        return {k: _tokens_folded(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_tokens_folded(v) for v in tree]
    if isinstance(tree, bytes) and b"redacted:" in tree:
        return _TOKEN_BYTES.sub(b"redacted", tree)
    if isinstance(tree, str) and _B64_TOKEN_TEXT.search(tree):
        try:
            inner = base64.b64decode(tree, validate=True)
        except ValueError:
            return tree
        if b"redacted:" in inner:  # (hashed as the bytes it holds, tokens folded)
            return _TOKEN_BYTES.sub(b"redacted", inner)
    return tree


def stable_hash(library: str, fields: Tree) -> str:
    """A short, stable hex digest of ``fields`` (sorted-key canonical JSON) for ``library``;
    redaction tokens, in text and in bytes, count as one value."""
    raw = _encode_sorted([library, fields])
    if _B64_0 in raw or _B64_1 in raw or _B64_2 in raw:  # (rare: walked only then; three
        # substring searches cost less than one regex alternation, which tries each place)
        raw = _encode_sorted([library, _tokens_folded(fields)])
    if b"redacted:" in raw:
        raw = _TOKEN.sub("redacted", raw.decode()).encode()
    return library + ":" + hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(slots=True)
class Call:
    """One dependency call as a shim sees it, in a form both modes agree on.

    ``request`` may be given as a function that builds it: replay reads only the keys, so a
    shim can leave the stored form (redacted headers...) unbuilt until a miss, a shape match
    or a recording needs it.
    """

    library: str
    _request: Tree | Callable[[], Tree]
    identity: Tree
    shape: Tree
    label: str
    _key: str | None = field(default=None, repr=False)
    _shape_key: str | None = field(default=None, repr=False)
    _built: bool = field(default=False, repr=False)
    # The call as cassettes recorded before a change of its key saw it (see sql.sql_call):
    # looked up when the call itself is not found.
    before: Callable[[], Call] | None = field(default=None, repr=False)

    @property
    def request(self) -> Tree:
        if not self._built:
            if callable(self._request):
                self._request = self._request()
            self._built = True
        return self._request

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = stable_hash(self.library, self.identity)
        return self._key

    @property
    def shape_key(self) -> str:
        if self._shape_key is None:
            self._shape_key = stable_hash(self.library, self.shape)
        return self._shape_key


# --- HTTP: shared by httpx, requests and any other HTTP client shim --------------------------

# Trace context the instrumentation injects: it changes on every run, so it is never stored.
PROPAGATION_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})

@dataclass(frozen=True, slots=True)
class _Url:
    scheme: str
    host: str
    path: str
    query: list[list[str]]  # shared by every Call of this URL: read, never mutate
    query_keys: list[str]
    label: str


@functools.lru_cache(maxsize=4096)
def _parse_url(url: str) -> _Url:
    # Services call the same URLs again and again: parse each one once.
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and not (
        (parts.scheme == "http" and port == 80) or (parts.scheme == "https" and port == 443)
    ):
        host = f"{host}:{port}"
    pairs = sorted(parse_qsl(parts.query, keep_blank_values=True))
    path = parts.path or "/"
    return _Url(
        parts.scheme, host, path,
        [[k, v] for k, v in pairs], sorted({k for k, _ in pairs}),
        urlunsplit((parts.scheme, host, path, parts.query, "")),
    )


def _body_digest(body: bytes) -> str:
    if b"redacted:" in body:
        body = _TOKEN_BYTES.sub(b"redacted", body)
    return hashlib.blake2b(body, digest_size=16).hexdigest()


# Stored as given: ``(name, value)`` rows (httpx's are tuples shared across calls, see
# Redactor.header_rows; a cassette holds them as lists).
Headers = Sequence[Sequence[str]]


@functools.lru_cache(maxsize=4096)
def _http_keys(library: str, method: str, url: str, digest: str) -> tuple[Tree, Tree, str, str, str]:
    # identity, shape, their keys and the label: the same for every call of this method, URL
    # and body, and services repeat their calls. The trees are shared: read, never mutate.
    u = _parse_url(url)
    identity = {
        "method": method,
        "scheme": u.scheme,
        "host": u.host,
        "path": u.path,
        "query": u.query,
        "body": digest,
    }
    shape = {"method": method, "host": u.host, "path": u.path, "query_keys": u.query_keys}
    return (identity, shape, stable_hash(library, identity), stable_hash(library, shape),
            f"{method} {u.label}")


def http_call(
    library: str,
    method: str,
    url: str,
    headers: Headers | Callable[[], Headers],
    body: bytes,
) -> Call:
    """The :class:`Call` of an HTTP request; headers are stored but do not enter the key.

    ``headers`` (already redacted ``(name, value)`` rows, stored as they are) may be a
    function: without a body they are only needed for the stored request, which is then
    built on first use.
    """
    if body:
        # Configured JSON fields / form parameters in the body become tokens before the body
        # is stored or hashed; the hash folds tokens, so a per-process redaction key matches.
        from timetracer_otel.replay_shims.base import STATE  # base imports us

        if callable(headers):
            headers = headers()
        body, plain = STATE.redactor.body_parts(headers, body)
        withheld = plain is WITHHELD
        digest = "withheld" if withheld else _body_digest(body if plain is None else plain)
    else:
        digest, withheld = "", False
    method = method.upper()
    identity, shape, key, shape_key, label = _http_keys(library, method, url, digest)

    def request(h: Headers | Callable[[], Headers] = headers) -> Tree:
        rows = h() if callable(h) else h
        if not isinstance(rows, list | tuple):  # a generator, dict items...: stored as a list
            rows = list(rows)
        tree: dict[str, Any] = {"method": method, "url": url, "headers": rows, "body": body}
        if withheld:  # (see redaction.WITHHELD: a packed body too large to redact)
            tree["body_withheld"] = True
        return tree

    return Call(library, request if callable(headers) else request(), identity, shape, label,
                key, shape_key)


def field_diff(recorded: Tree, live: Tree, path: str = "", limit: int = 8) -> list[str]:
    """Human-readable differences between two request trees, at most ``limit`` lines."""
    out: list[str] = []
    _diff(recorded, live, path, out, limit)
    return out


def _cut(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _shown(a: Any, b: Any) -> tuple[str, str]:
    """Both values as the diff shows them, at most 60 characters each; two long values
    that start alike (a SQL statement with one literal changed) are shown from a little
    before the first character where they differ."""
    ta, tb = repr(a), repr(b)
    if len(ta) > 60 or len(tb) > 60:
        pairs = enumerate(zip(ta, tb, strict=False))
        same = next((i for i, (x, y) in pairs if x != y), min(len(ta), len(tb)))
        start = same - 20
        if start > 3:
            ta, tb = "..." + ta[start:], "..." + tb[start:]
    return _cut(ta), _cut(tb)


def _diff(a: Tree, b: Tree, path: str, out: list[str], limit: int) -> None:
    # A live request may hold tuples (shared header rows) where its recording holds lists.
    if type(a) is tuple:
        a = list(a)
    if type(b) is tuple:
        b = list(b)
    if isinstance(a, str) and isinstance(b, bytes | bytearray):
        # A JSON cassette carries recorded bytes as base64 text.
        with contextlib.suppress(ValueError):
            a = base64.b64decode(a, validate=True)
    if len(out) >= limit or a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(dict.fromkeys([*a, *b])):
            _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else k, out, limit)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out, limit)
        return
    shown_a, shown_b = _shown(a, b)
    out.append(f"{path or '<value>'}: recorded {shown_a}, now {shown_b}")
