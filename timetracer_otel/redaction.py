"""Redaction at capture: secrets become keyed-hash tokens before they reach a span or disk.

Names match exactly or by glob (``x-*-token``), case-insensitively, never by substring: a rule
for ``age`` leaves ``message`` alone. A redacted value becomes ``redacted:<16 hex>``, an HMAC
of the value: with ``TIMETRACER_REDACTION_KEY`` set, equal secrets give equal tokens across
runs; without it the key is random per process (equal within one recording)::

    >>> r = Redactor(json_paths=["user.ssn"], sql=["$2"])
    >>> r.headers([("Authorization", "Bearer abc"), ("Accept", "*/*")])
    [('Authorization', 'redacted:...'), ('Accept', '*/*')]

Only the stored copy is redacted: the application always sends and receives the real values
while recording. On replay, a response field that was redacted comes back as its token.

Rules come from the API (:func:`configure`), from ``TIMETRACER_REDACT`` (comma-separated
``kind:name`` rules: ``header:x-session,query:sid,json:user.ssn,json:**.card,sql:$2,mongo:ssn``)
and from the TOML or JSON file named by ``TIMETRACER_REDACT_FILE``.
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import hashlib
import hmac
import importlib
import io
import itertools
import json
import logging
import operator
import os
import re
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import tomllib

from timetracer_otel.errors import ConfigError

_pack = msgspec.msgpack.Encoder().encode

SECRET_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-amz-security-token",
    "x-amz-content-sha256",
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
# Keys redacted at any depth of a JSON body (and of Mongo documents): exact names only.
SECRET_FIELDS = (
    "password",
    "passwd",
    "client_secret",
    "access_token",
    "refresh_token",
    "id_token",
    "api_key",
    "apikey",
    "private_key",
    "secretstring",  # AWS Secrets Manager GetSecretValue
    "secretbinary",
)

TOKEN_PREFIX = "redacted:"
_MASK = TOKEN_PREFIX.encode()
_TOKEN_RE = re.compile(r"redacted:[0-9a-f]{16}")
# A whole token in encoded bytes (a packed request: see index.ReplayIndex).
TOKEN_BYTES_RE = re.compile(_TOKEN_RE.pattern.encode())
_GLOB_CHARS = "*?["
# Only values that look like secrets are scrubbed from free text later: a cookie "theme=darkmode"
# or "key=products" must not rewrite every body that mentions "darkmode" or "products".
_MIN_SCRUB_LEN = 8
_LONG_SCRUB_LEN = 20


log = logging.getLogger("timetracer_otel")

# What each content encoding whose module may be missing needs, as pip names it.
_CODEC_PACKAGES = {"br": "'brotli>=1.2'", "zstd": "zstandard"}  # (brotli: its output limit)
_warned: set[str] = set()
# The most a content-encoded body is unpacked to for redaction (the OTLP receiver's limit for
# a gzip request): a small body may inflate a thousandfold, and the writer must stay bounded.
UNPACK_LIMIT = 64 * 1024 * 1024
_Unpack = Callable[[bytes, int, bool], bytes]
_Codec = tuple[_Unpack, Callable[[bytes], bytes]]


class TooLarge(Exception):
    """A body that unpacks to more than the limit."""


class Withheld(Exception):
    """A response body that cannot be redacted (it unpacks past the limit) and may hold a
    secret: the call is stored without its response, as one past the payload limit is."""


# What :meth:`Redactor.body_parts` gives as the second part for a request body that cannot be
# redacted (it unpacks past the limit) and may hold a secret: stored without its bytes, and
# keyed without them (a replay matches it by method and URL), since a digest of bytes holding
# a secret would change with the secret (a replay's dummy token) and could give it away.
# Told apart by identity: no body the redactor makes is this object (an empty one would be
# CPython's one empty bytes object, so the marker is not empty).
WITHHELD = b"<timetracer-otel: withheld>"


# The piece of a packed body unpacked at a time, when one past the limit is scanned.
_SCAN_PIECE = 1 << 20


def _inflated_pieces(body: bytes, wbits: int) -> Iterator[bytes]:
    """:func:`_unpacked_pieces` for gzip (its members one after another) and deflate: the
    input fed a slice at a time, so what zlib leaves unconsumed is never more than a slice
    (feeding it whole copied the rest of the body for every piece); a stream's last bytes,
    which raw deflate can hold back with no input left, flushed out."""
    data = body
    while data:
        unpacker = zlib.decompressobj(wbits)
        pos = 0
        while not unpacker.eof:
            chunk = unpacker.unconsumed_tail
            if not chunk and pos < len(data):
                chunk = data[pos:pos + _SCAN_PIECE]
                pos += len(chunk)
            piece = unpacker.decompress(chunk, _SCAN_PIECE)
            if piece:
                yield piece
            elif not chunk:  # no input left, nothing more out
                break
        if not unpacker.eof:  # (cut short, or raw deflate's end: what it still holds)
            if tail := unpacker.flush():
                yield tail
            return
        data = (unpacker.unused_data + data[pos:]).lstrip(b"\0")
        if wbits != 31 or data[:2] != b"\x1f\x8b":  # (one stream; a tail that is no member)
            return


def _unpacked_pieces(encoding: str, body: bytes) -> Iterator[bytes]:
    """The plain bytes of a body of one coding, a piece of at most about ``_SCAN_PIECE``
    at a time (memory stays bounded, whatever the body inflates to). ValueError for a coding
    it cannot unpack so (none, several, one without a module)."""
    if encoding in ("gzip", "x-gzip"):
        yield from _inflated_pieces(body, 31)
        return
    if encoding == "deflate":  # zlib-wrapped (its header's checksum), or raw
        wrapped = len(body) > 1 and body[0] & 0x0F == 8 and int.from_bytes(body[:2], "big") % 31 == 0
        yield from _inflated_pieces(body, zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return
    if encoding == "br":
        for name in ("brotli", "brotlicffi"):
            try:
                brotli = importlib.import_module(name)
            except ImportError:
                continue
            unpacker = brotli.Decompressor()
            piece = unpacker.process(body, output_buffer_limit=_SCAN_PIECE)
            while piece:
                yield piece
                if unpacker.is_finished():
                    return
                piece = unpacker.process(b"", output_buffer_limit=_SCAN_PIECE)
            return
    if encoding == "zstd":
        for name in ("compression.zstd", "backports.zstd"):  # (as _codec picks them)
            try:
                zstd = importlib.import_module(name)
            except ImportError:
                continue
            data = body
            while data:
                unpacker = zstd.ZstdDecompressor()
                piece = unpacker.decompress(data, _SCAN_PIECE)
                while True:
                    if piece:
                        yield piece
                    if unpacker.eof or (unpacker.needs_input and not piece):
                        break
                    piece = unpacker.decompress(b"", _SCAN_PIECE)
                if not unpacker.eof:
                    return
                data = unpacker.unused_data
            return
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError:
            pass
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body),
                                                              read_across_frames=True)
            while piece := reader.read(_SCAN_PIECE):
                yield piece
            return
    raise ValueError(f"cannot unpack {encoding!r} piece by piece")


def _unpack_limit(env: Mapping[str, str]) -> int:
    """``TIMETRACER_MAX_UNPACKED_BYTES``: how far a packed body is unpacked for redaction
    (default :data:`UNPACK_LIMIT`), checked as every size setting is."""
    from timetracer_otel.config import _size

    return _size(env, "TIMETRACER_MAX_UNPACKED_BYTES", UNPACK_LIMIT)


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _deflated(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(wbits=wbits)
    return packer.compress(data) + packer.flush()


def unpack_streams(make: Callable[[], Any], body: bytes, limit: int, several: bool = True,
                   lenient: bool = False, partial: bool = False) -> bytes:
    """The streams in ``body`` one after another (gzip's members, zstd's frames; one only,
    unless ``several``), each by an unpacker from ``make`` (zlib's or zstd's: ``decompress``
    with a maximum length, ``eof``, ``unused_data``), at most ``limit`` bytes in all.
    TooLarge past it; EOFError for a stream cut short; the module's error for a broken one.
    ``lenient``, as HTTP clients read gzip: NUL padding after a member, and anything after
    it that does not start as a member does, is not part of the body. ``partial``: a stream
    cut short gives what its bytes hold (a body the app stopped reading part way)."""
    out = bytearray()
    data = body
    while data:
        unpacker = make()
        out += unpacker.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise TooLarge
        if not unpacker.eof:
            if partial:
                break
            raise EOFError("the stream is cut short")
        data = unpacker.unused_data
        if not several:
            break
        if lenient:
            data = data.lstrip(b"\0")
            if data[:2] != b"\x1f\x8b":  # (gzip's magic: a tail that is no member)
                break
    return bytes(out)


def _inflated(body: bytes, limit: int, wbits: int, partial: bool = False) -> bytes:
    return unpack_streams(lambda: zlib.decompressobj(wbits), body, limit, several=wbits == 31,
                          lenient=True, partial=partial)


def _zstd_frames(zstd: Any) -> _Unpack:
    return lambda body, limit, partial: unpack_streams(zstd.ZstdDecompressor, body, limit,
                                                       partial=partial)


def _zstandard_frames(zstandard: Any) -> _Unpack:
    def unpack(body: bytes, limit: int, partial: bool) -> bytes:
        # Its one-shot unpacker has no limit: the size is found by a bounded read first,
        # then the frames unpacked one by one, each checked for its end (the bounded reader
        # says nothing of a cut one).
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body),
                                                          read_across_frames=True)
        if len(reader.read(limit + 1)) > limit:
            raise TooLarge
        out = bytearray()
        data = body
        while data:
            unpacker = zstandard.ZstdDecompressor().decompressobj()
            out += unpacker.decompress(data)
            if not unpacker.eof:
                if partial:
                    break
                raise EOFError("the stream is cut short")
            data = unpacker.unused_data
        return bytes(out)

    return unpack


def _brotli_stream(brotli: Any) -> _Unpack:
    def unpack(body: bytes, limit: int, partial: bool) -> bytes:
        unpacker = brotli.Decompressor()
        out = unpacker.process(body, output_buffer_limit=limit + 1)  # (a soft limit: it may
        if len(out) > limit:  # give a quarter more, never the whole of a bomb)
            raise TooLarge
        if not unpacker.is_finished() and not partial:
            raise EOFError("the stream is cut short")
        return bytes(out)

    return unpack


@functools.cache
def _codec(encoding: str) -> _Codec | None:
    """How to unpack (at most a limit) and pack a body of ``encoding``: brotli and zstd with
    whichever module the HTTP clients decode them with, when one is installed; None if none
    is."""
    if encoding == "br":
        for name in ("brotli", "brotlicffi"):
            try:
                brotli = importlib.import_module(name)
                brotli.Decompressor().process(b"", output_buffer_limit=1)
            except ImportError:
                continue
            except TypeError:  # (before 1.2: no output limit, so no bound on a bomb)
                continue
            # Packed again fast (quality 4, not its default 11: seconds per MiB), as the
            # replaying client only needs to decode it.
            return _brotli_stream(brotli), functools.partial(brotli.compress, quality=4)
    elif encoding == "zstd":
        for name in ("compression.zstd", "backports.zstd"):  # (urllib3's; the stdlib's API)
            try:
                zstd = importlib.import_module(name)
            except ImportError:
                continue
            return _zstd_frames(zstd), zstd.compress
        try:
            zstandard = importlib.import_module("zstandard")  # (httpx's)
        except ImportError:
            return None
        return _zstandard_frames(zstandard), zstandard.ZstdCompressor().compress
    return None


def unpacked(encoding: str, body: bytes, limit: int = UNPACK_LIMIT, partial: bool = False
             ) -> tuple[bytes, Callable[[bytes], bytes]] | None:
    """A content-encoded body's plain bytes and how to pack them again: gzip; deflate as HTTP
    sends it, zlib-wrapped or raw; brotli (``br``) and ``zstd`` where a module for them is
    installed (as the HTTP clients need one to decode them). None for another encoding or a
    broken stream; for br or zstd without a module, a warning, once, that such bodies are
    stored as they came, not redacted inside. :class:`TooLarge` for one that unpacks past
    ``limit`` bytes (``Redactor.body_parts`` scans it a piece at a time). ``partial``: a
    stream cut short (a body the app stopped reading) gives the bytes it holds, which pack
    again as a whole stream."""
    try:
        if encoding in ("gzip", "x-gzip"):
            return _inflated(body, limit, 31, partial), lambda b: gzip.compress(b, mtime=0)
        if encoding == "deflate":
            try:
                return _inflated(body, limit, zlib.MAX_WBITS, partial), \
                    lambda b: _deflated(b, zlib.MAX_WBITS)
            except zlib.error:  # raw deflate, without the zlib header
                return _inflated(body, limit, -zlib.MAX_WBITS, partial), \
                    lambda b: _deflated(b, -15)
        codec = _codec(encoding)
        if codec is not None:
            return codec[0](body, limit, partial), codec[1]
    except TooLarge:
        raise
    except Exception:  # a broken stream (each module raises its own error class)
        return None
    if encoding in _CODEC_PACKAGES:
        _warn_once(encoding, "timetracer-otel: %s-encoded bodies are stored as they came, not "
                   "redacted inside; pip install %s so that secrets in them are redacted.",
                   encoding, _CODEC_PACKAGES[encoding])
    return None


def unpacked_codings(codings: str, body: bytes, limit: int = UNPACK_LIMIT, partial: bool = False
                     ) -> tuple[bytes, Callable[[bytes], bytes]] | None:
    """As :func:`unpacked`, for a Content-Encoding value listing one coding or several in
    the order they were applied (``gzip, br``: unpacked br first, packed gzip first)."""
    names = [name for name in (c.strip().lower() for c in codings.split(","))
             if name not in ("", "identity")]
    if len(names) == 1:
        return unpacked(names[0], body, limit, partial)
    packs: list[Callable[[bytes], bytes]] = []
    for name in reversed(names):
        found = unpacked(name, body, limit, partial)
        if found is None:
            return None
        body, pack = found
        packs.append(pack)

    def pack_all(data: bytes) -> bytes:
        for pack in reversed(packs):
            data = pack(data)
        return data

    return body, pack_all


def _looks_secret(value: str, sure: bool = False) -> bool:
    """Whether a redacted value is also scrubbed from free text later. ``sure``: it came
    from where only secrets go (a password, credentials, a secret JSON field, a rule of the
    user's), so its length decides; otherwise (a cookie, a query parameter named like a key)
    it must also look like one."""
    if len(value) < _MIN_SCRUB_LEN or any(c.isspace() for c in value):
        return False
    if sure or len(value) >= _LONG_SCRUB_LEN:
        return True
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)

_SEEN_LIMIT = 512
_lower_of = operator.itemgetter(1)
# scheme://user:password@host in free text (error messages, log lines).
_URL_USERINFO = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]*:)(?P<pw>[^@\s'\"]+)(?=@)")
# Span attributes holding URLs or query strings, and the prefixes of captured header attributes.
_URL_ATTRS = frozenset({"http.url", "url.full", "http.target", "db.connection_string", "server.url"})
_HEADER_ATTRS = ("http.request.header.", "http.response.header.")
# libpq key=value DSNs: password=secret or password='secret'.
_KV_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.I)

def _anchors(names: Iterable[bytes], shortest: int = 4) -> tuple[bytes, ...]:
    """Few substrings such that every one of ``names`` contains at least one: a body holding
    none of them holds none of the names. Each costs one C-speed scan, so fewer is faster;
    substrings of at least ``shortest`` bytes (or a whole shorter name) keep false alarms,
    which only send a body to the full check, rare. The defaults need 5 instead of 11::

        >>> _anchors([b"access_token", b"id_token", b"passwd", b"password"])
        (b'_token', b'passw')
    """
    left = set(names)
    if len(left) > 32:  # the search below grows with the square of the names: scan them all
        return tuple(sorted(left))
    out: list[bytes] = []
    while left:
        covers: dict[bytes, int] = {}
        for name in left:
            size = min(shortest, len(name))
            for sub in {name[i:j] for i in range(len(name)) for j in range(i + size, len(name) + 1)}:
                covers[sub] = covers.get(sub, 0) + 1
        best = max(sorted(covers), key=lambda sub: (covers[sub], len(sub)))
        out.append(best)
        left = {name for name in left if best not in name}
    return tuple(out)


# Learning a secret compiles nothing: it joins _Known.recent, searched for one by one, until
# there are enough of them (a quarter of the compiled ones, at least _RECENT_MIN) or searching
# for them has cost about what compiling would (_RENT plain scans per secret; see
# Redactor._fresh). Compiling the alternation costs about 40 us per secret (str and bytes), so
# a recording that learns a secret on every request (a bearer token each) must not compile
# all of them again on every request: that made recording quadratic in the secrets learned.
_RECENT_MIN = 16
_RENT = 64


class _Known:
    """What a scrub looks for: ``text`` and ``data`` are one alternation (longest first) of the
    secrets that were seen when it was built (``compiled``), for str and for bytes; ``recent``
    (and ``recent_data``, UTF-8) those learned since, not yet compiled; ``stale`` how many
    compiled secrets were forgotten since (evicted: a match of one is not a secret any more).
    ``clean_text`` and ``clean_data`` are the patterns when they are all there is to it."""

    __slots__ = ("clean_data", "clean_text", "compiled", "data", "dirty", "recent",
                 "recent_data", "stale", "text")

    def __init__(self, text: re.Pattern[str] | None, data: re.Pattern[bytes] | None,
                 compiled: frozenset[str], recent: tuple[str, ...] = (),
                 recent_data: tuple[bytes, ...] = (), stale: int = 0) -> None:
        self.text, self.data, self.compiled = text, data, compiled
        self.recent, self.recent_data, self.stale = recent, recent_data, stale
        self.dirty = bool(recent or stale or text is None)
        self.clean_text = None if self.dirty else text
        self.clean_data = None if self.dirty else data


def _union_spans(data: AnyStr, pattern: re.Pattern[AnyStr] | None, recent: tuple[AnyStr, ...],
                 current: Callable[[AnyStr], bool]) -> list[tuple[int, int]]:
    """Where one longest-first alternation of the current secrets would match in ``data``
    (leftmost first, the longest there, not overlapping), found with ``pattern`` (some of
    whose secrets may not be current any more: ``current`` tells) and plain searches for the
    ``recent`` ones."""

    def compiled_from(pos: int) -> tuple[int, int] | None:
        if pattern is None:
            return None
        m = pattern.search(data, pos)
        while m is not None:
            start = m.start()
            here: re.Match[AnyStr] | None = m
            while here is not None and not current(here[0]):  # forgotten: a shorter one here?
                here = pattern.match(data, start, here.end() - 1)
            if here is not None:
                return here.span()
            m = pattern.search(data, start + 1)
        return None

    def recent_from(pos: int) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for secret in recent:
            i = data.find(secret, pos)
            if i >= 0 and (best is None or i < best[0] or (i == best[0] and i + len(secret) > best[1])):
                best = (i, i + len(secret))
        return best

    spans: list[tuple[int, int]] = []
    a, b = compiled_from(0), recent_from(0)
    while a is not None or b is not None:
        pick = a if b is None or (a is not None and (a[0], -a[1]) <= (b[0], -b[1])) else b
        assert pick is not None
        spans.append(pick)
        if a is not None and a[0] < pick[1]:
            a = compiled_from(pick[1])
        if b is not None and b[0] < pick[1]:
            b = recent_from(pick[1])
    return spans


def _replaced(data: AnyStr, spans: list[tuple[int, int]], repl: Callable[[AnyStr], AnyStr]) -> AnyStr:
    parts: list[AnyStr] = []
    last = 0
    for start, end in spans:
        parts.append(data[last:start])
        parts.append(repl(data[start:end]))
        last = end
    parts.append(data[last:])
    return data[:0].join(parts)


class _NameSet:
    """Exact names in a set (O(1)), glob patterns checked one by one; case-insensitive."""

    def __init__(self, names: Iterable[str]) -> None:
        lowered = [n.lower() for n in names]
        self.exact = frozenset(n for n in lowered if not any(c in n for c in _GLOB_CHARS))
        self.exact_bytes = frozenset(n.encode("latin-1", "replace") for n in self.exact)
        self.globs = tuple(dict.fromkeys(n for n in lowered if n not in self.exact))
        self._memo: dict[str, bool] = {}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        hit = self._memo.get(name)
        if hit is None:
            lower = name.lower()
            hit = lower in self.exact or any(fnmatch.fnmatchcase(lower, g) for g in self.globs)
            if len(self._memo) < 4096:  # header and field names repeat on every call
                self._memo[name] = hit
        return hit

    def __bool__(self) -> bool:
        return bool(self.exact or self.globs)

@dataclass(frozen=True, slots=True)
class SqlRule:
    """Parameters to redact: 1-based positions (``$2`` / ``2``) or names (``:ssn``), in the
    statements matching ``statement`` (a glob over the normalised statement; None: all)."""

    params: tuple[int | str, ...]
    statement: str | None = None

    def applies(self, statement: str) -> bool:
        return self.statement is None or fnmatch.fnmatchcase(statement.lower(), self.statement.lower())

def _parse_sql_param(value: str | int) -> int | str:
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"SQL parameter position {value} is not valid; positions start at 1.")
        return value
    text = value.strip()
    if text.startswith("$"):
        text = text[1:]
    if text.isdigit():
        return _parse_sql_param(int(text))
    name = text.lstrip(":").removeprefix("%(").removesuffix(")s")
    if not name:
        raise ConfigError(f"SQL redaction rule {value!r} names no parameter; use $2 or :name.")
    return name

def _parse_path(path: str) -> tuple[str, ...]:
    text = path.strip().removeprefix("$.").removeprefix("$")
    segments = tuple(s for s in text.replace("[*]", "").replace("[]", "").split(".") if s)
    if not segments or segments[-1] == "**":
        raise ConfigError(f"JSON path {path!r} names no field; write it like user.password or **.ssn.")
    return segments

def _split_rules(text: str) -> list[tuple[str, str]]:
    rules = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        kind, sep, value = raw.partition(":")
        if not sep or not value.strip():
            raise ConfigError(
                f"TIMETRACER_REDACT rule {raw!r} has no kind; write kind:name with kind one of "
                "header, query, json, sql, mongo."
            )
        rules.append((kind.strip().lower(), value.strip()))
    return rules

_KINDS = {"header": "headers", "headers": "headers", "query": "params", "param": "params",
          "params": "params", "json": "json_paths", "sql": "sql", "mongo": "mongo_fields"}

def load_rules(path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Read redaction rules from a TOML or JSON file (keys: headers, query, json, sql, mongo).

    ``sql`` entries are positions/names for every statement, or tables
    ``{statement = "INSERT INTO users*", params = [2]}``.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        data = json.loads(raw) if p.suffix == ".json" else tomllib.loads(raw.decode())
    except OSError as exc:
        raise ConfigError(f"cannot read the redaction rules file {p} ({exc.strerror}).") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the redaction rules file {p} is not valid ({exc}); fix its syntax.") from None
    if isinstance(data, dict) and isinstance(data.get("redact"), dict):
        data = data["redact"]
    if not isinstance(data, dict):
        raise ConfigError(f"the redaction rules file {p} must hold a table of rule lists.")
    out: dict[str, list[Any]] = {}
    for kind, values in data.items():
        target = _KINDS.get(str(kind).lower())
        if target is None or not isinstance(values, list):
            raise ConfigError(
                f"the redaction rules file {p} has an unknown entry {kind!r}; use lists named "
                "headers, query, json, sql, mongo."
            )
        out.setdefault(target, []).extend(values)
    return out

class Redactor:
    """Replaces secret values with match-preserving tokens, in every place a shim stores.

    >>> r = Redactor(headers=["x-session"], params=["sid"], json_paths=["**.ssn"])
    >>> r.url("https://u:pw@api.example/v1?sid=abc&page=2")
    'https://u:redacted:...@api.example/v1?sid=redacted%3A...&page=2'
    """

    def __init__(
        self,
        *,
        headers: Iterable[str] = (),
        params: Iterable[str] = (),
        json_paths: Iterable[str] = (),
        sql: Iterable[str | int | SqlRule | Mapping[str, Any]] = (),
        mongo_fields: Iterable[str] = (),
        key: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        env_key = env.get("TIMETRACER_REDACTION_KEY")
        if isinstance(key, str):
            key = key.encode()
        self.key = key or (env_key.encode() if env_key else secrets.token_bytes(32))
        # The most a packed body is unpacked to for redaction (past it, see body_parts).
        self.unpack_limit = _unpack_limit(env)
        rules: dict[str, list[Any]] = {
            "headers": [*headers, *_extra(env, "TIMETRACER_REDACT_HEADERS")],
            "params": [*params, *_extra(env, "TIMETRACER_REDACT_PARAMS")],
            "json_paths": list(json_paths),
            "sql": list(sql),
            "mongo_fields": list(mongo_fields),
        }
        if env.get("TIMETRACER_REDACT_FILE"):
            for kind, values in load_rules(env["TIMETRACER_REDACT_FILE"]).items():
                rules[kind].extend(values)
        for kind, value in _split_rules(env.get("TIMETRACER_REDACT", "")):
            target = _KINDS.get(kind)
            if target is None:
                raise ConfigError(
                    f"TIMETRACER_REDACT rule kind {kind!r} is unknown; use one of: "
                    "header, query, json, sql, mongo."
                )
            rules[target].append(value)
        self.header_names = _NameSet([*SECRET_HEADERS, *rules["headers"]])
        self.param_names = _NameSet([*SECRET_PARAMS, *rules["params"]])
        self.field_names = _NameSet([*SECRET_FIELDS, *rules["mongo_fields"]])
        # Keyword arguments (a task's): secret-looking names, without the bare "key"/"sig" of
        # URLs, which name cache keys and object keys far more often than secrets there.
        self.argument_names = _NameSet([
            *SECRET_FIELDS, *(p for p in SECRET_PARAMS if p not in ("key", "sig")),
            "*_token", "*_secret", "*password*", "auth", "credentials",
            *rules["params"], *rules["mongo_fields"]])
        anywhere: list[str] = []
        paths: list[tuple[str, ...]] = []
        for p in rules["json_paths"]:
            segs = _parse_path(p)
            if len(segs) == 2 and segs[0] == "**":
                anywhere.append(segs[1])
            else:
                paths.append(segs)
        self.json_anywhere = _NameSet([*SECRET_FIELDS, *anywhere])
        self.json_paths = tuple(paths)
        self.sql_rules = tuple(self._sql_rule(r) for r in rules["sql"])
        self._seen: OrderedDict[str, str] = OrderedDict()
        # Moves on whenever a secret is learned: a result computed before is stale then.
        self.generation = 0
        self._known: _Known | None = None  # None: no secret seen yet
        self._rent = 0  # plain searches for recent secrets since the last compile (see _fresh)
        self._url_memo: dict[str, str] = {}
        self._header_rows: dict[frozenset[bytes], dict[tuple[bytes, bytes, bytes], tuple[str, str]]] = {}
        # What a JSON body is scanned for before it is parsed: substrings that every configured
        # field name (case-folded) contains one of (see _anchors), tested one by one. One
        # alternation regex of the names was slower: re tries every alternative at every byte.
        self._json_anchors = _anchors(n.encode() for n in self.json_anywhere.exact)
        # An HTTP response is scanned once for those, a password and an encoded or form body.
        self._response_marks = (*_anchors([*self._json_anchors, b"password"]),
                                b"content-encoding", b"urlencoded")
        self._lock = threading.Lock()

    @staticmethod
    def _sql_rule(rule: str | int | SqlRule | Mapping[str, Any]) -> SqlRule:
        if isinstance(rule, SqlRule):
            return rule
        if isinstance(rule, Mapping):
            params = rule.get("params", rule.get("positions", ()))
            params = [params] if isinstance(params, str | int) else list(params)
            return SqlRule(tuple(_parse_sql_param(v) for v in params), rule.get("statement"))
        return SqlRule((_parse_sql_param(rule),))

    # --- tokens ----------------------------------------------------------------------------

    def token(self, value: str | bytes, sure: bool = True) -> str:
        """``redacted:<16 hex>`` for ``value``; a token passes through unchanged. ``sure``:
        ``value`` is a secret for certain, not only by the name of where it was (a cookie, a
        query parameter), for scrubbing it from free text later (see :func:`_looks_secret`)."""
        if isinstance(value, str) and _TOKEN_RE.fullmatch(value):
            return value
        data = value.encode() if isinstance(value, str) else value
        tok = TOKEN_PREFIX + hmac.new(self.key, data, hashlib.sha256).hexdigest()[:16]
        self._remember(value, tok, sure)
        return tok

    def _remember(self, value: str | bytes, tok: str, sure: bool = False) -> None:
        # Secrets seen once are scrubbed from free text later (an error message quoting the
        # URL, an upstream echoing the header back), whatever field they turn up in.
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                return
        if not _looks_secret(value, sure) or value in self._seen:
            return
        with self._lock:
            self._add_seen(value, tok)

    def _add_seen(self, value: str, tok: str) -> None:
        """Remember ``value`` (the lock held): it joins the recent secrets, which a scrub
        searches for one by one until the next compile; nothing is compiled here."""
        if not value or value in self._seen:
            return
        self._seen[value] = tok
        known = self._known
        recent: tuple[str, ...]
        recent_data: tuple[bytes, ...]
        if known is None:
            compiled: frozenset[str] = frozenset()
            recent, recent_data, stale, text, data = (value,), (value.encode(),), 0, None, None
        else:
            compiled, stale, text, data = known.compiled, known.stale, known.text, known.data
            recent, recent_data = (*known.recent, value), (*known.recent_data, value.encode())
        while len(self._seen) > _SEEN_LIMIT:
            old, _ = self._seen.popitem(last=False)
            if old in compiled:
                stale += 1
            if old in recent:
                i = recent.index(old)
                recent, recent_data = recent[:i] + recent[i + 1:], recent_data[:i] + recent_data[i + 1:]
        self._known = _Known(text, data, compiled, recent, recent_data, stale)
        self.generation += 1

    # --- handing the redactor to the cassette writer's process --------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Configuration, key and learned secrets; caches and the lock are made afresh."""
        state = dict(self.__dict__)
        with self._lock:
            state["_seen"] = OrderedDict(self._seen)
        for name in ("_lock", "_url_memo", "_header_rows", "_known", "_rent"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._url_memo = {}
        self._header_rows = {}
        self._rent = 0
        self._known = _Known(None, None, frozenset(), tuple(self._seen),
                             tuple(v.encode() for v in self._seen)) if self._seen else None

    def fork(self, *, learned: bool = False) -> Redactor:
        """A redactor with these rules and this key (equal secrets, equal tokens), knowing the
        secrets learned so far only with ``learned``: one per test, whose scrubbing (and so
        whose keys) must not depend on what ran before it. ``generation`` goes on from here."""
        state = self.__getstate__()
        if not learned:
            state["_seen"] = OrderedDict()
        copy = Redactor.__new__(Redactor)
        copy.__setstate__(state)
        return copy

    def learned_since(self, generation: int) -> tuple[int, list[tuple[str, str]]]:
        """The secrets learned after ``generation`` (oldest first, as ``(value, token)``) and
        the generation they bring a copy to; all that are kept if some were evicted since."""
        with self._lock:
            count = min(self.generation - generation, len(self._seen))
            newest = list(itertools.islice(reversed(self._seen.items()), max(count, 0)))
            return self.generation, newest[::-1]

    def learn(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Take secrets another copy of this redactor learned (see :meth:`learned_since`)."""
        with self._lock:
            for value, tok in pairs:
                self._add_seen(value, tok)

    def _any_token(self, value: Any) -> str:
        if isinstance(value, str | bytes):
            return self.token(value)
        return self.token(json.dumps(value, sort_keys=True, default=repr))

    def _leaves_token(self, value: Any) -> Any:
        """A secret field's value with every leaf a token and its structure kept, so a typed
        wire format (DynamoDB's ``{"S": ...}``) still parses; a codec-tagged value (one
        ``$`` key) is one leaf."""
        if isinstance(value, dict) and not (len(value) == 1 and str(next(iter(value))).startswith("$")):
            return {k: self._leaves_token(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._leaves_token(v) for v in value]
        return value if value is None else self._any_token(value)

    # --- headers, URLs, DSNs ---------------------------------------------------------------

    def headers(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        names = self.header_names
        memo = names._memo  # every call carries the same few header names: no method call each
        out = []
        for k, v in pairs:
            hit = memo.get(k)
            if hit is None:
                hit = k in names
            out.append((k, self.header(k, v)) if hit else (k, v))
        return out

    def header_rows(
        self, triples: Iterable[tuple[bytes, bytes, bytes]], skip: frozenset[bytes] = frozenset()
    ) -> list[tuple[str, str]]:
        """Raw headers as h11 and httpx keep them, ``(name, lowercased name, value)`` bytes,
        as the stored ``(name, value)`` rows (latin-1) with secret values tokenized; names
        whose lowercase is in ``skip`` are left out.

        A service sends and receives the same headers on every call (user agent, accept,
        content type...): a row without a secret is decoded once and shared afterwards (rows
        are tuples, so sharing is safe). A secret is tokenized on every call, never cached."""
        cache = self._header_rows.get(skip)
        if cache is None:
            cache = self._header_rows[skip] = {}
        rows: list[tuple[str, str]] = []
        for triple in triples:
            row: tuple[str, str] | tuple[()] | None = cache.get(triple)
            if row is None:
                row = self._header_row(triple, skip, cache)
            if row:
                rows.append(row)
        return rows

    def _header_row(
        self, triple: tuple[bytes, bytes, bytes], skip: frozenset[bytes],
        cache: dict[tuple[bytes, bytes, bytes], tuple[str, str]],
    ) -> tuple[str, str] | tuple[()]:
        raw, lower, value = triple
        if lower in skip:
            return ()  # not cached: skipped headers (trace context) change on every call
        name, text = raw.decode("latin-1"), value.decode("latin-1")
        if name in self.header_names:
            return (name, self.header(name, text))
        if len(cache) >= 4096:  # values that change on every call (Date) must not pile up
            cache.clear()
        row = cache[triple] = (name, text)
        return row

    def learn_headers(self, triples: Iterable[tuple[bytes, bytes, bytes]]) -> None:
        """Tokenize the secret values among raw header triples (see :meth:`header_rows`), for
        their secrets to be known and scrubbed later; the rows themselves are not built.
        Without glob rules, headers with no secret name cost one pass in C."""
        names = self.header_names
        if not names.globs:
            if names.exact_bytes.isdisjoint(map(_lower_of, triples)):  # one pass, in C
                return
            for raw, lower, value in triples:
                if lower in names.exact_bytes:
                    self.header(raw.decode("latin-1"), value.decode("latin-1"))
            return
        for raw, _, value in triples:
            name = raw.decode("latin-1")
            if name in names:
                self.header(name, value.decode("latin-1"))

    def learn_header_pairs(self, pairs: Iterable[tuple[str, str | bytes] | list[str]]) -> None:
        """:meth:`learn_headers` for ``(name, value)`` text pairs (bytes values as latin-1)."""
        names = self.header_names
        for name, value in pairs:
            if name in names:
                self.header(name, value if isinstance(value, str) else value.decode("latin-1"))

    def header(self, name: str, value: str) -> str:
        if name not in self.header_names:
            return value
        lower = name.lower()
        if lower == "cookie":  # keep the cookie names, so the app still finds its cookies
            return "; ".join(self._cookie(c) for c in value.split("; "))
        if lower == "set-cookie":  # the value goes; name and attributes (Path, Expires) stay
            first, sep, attrs = value.partition(";")
            return self._cookie(first) + sep + attrs
        scheme, sp, credentials = value.partition(" ")
        if sp and lower in ("authorization", "proxy-authorization") and scheme.isalpha():
            return f"{scheme} {self.token(credentials)}"  # "Bearer <token>": the scheme stays
        return self.token(value)

    def _param(self, name: str, value: str) -> str:
        """A query parameter's value, a token if ``name`` is a secret parameter's (named like a
        key: scrubbed from free text later only if it also looks like a secret)."""
        return self.token(value, sure=False) if name in self.param_names else value

    def _cookie(self, pair: str) -> str:
        name, sep, value = pair.partition("=")
        return f"{name}={self.token(value, sure=False)}" if sep else self.token(pair, sure=False)

    def url(self, url: str) -> str:
        """``url`` with its password and secret query parameters replaced by tokens."""
        if "?" not in url and "@" not in url:
            return url
        done = self._url_memo.get(url)
        if done is None:
            done = self._url(url)
            if len(self._url_memo) < 4096:  # services call the same URLs again and again
                self._url_memo[url] = done
        return done

    def _url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, password = userinfo.partition(":")
            if sep and password != "REDACTED":  # OTel's own placeholder stays as it is
                netloc = f"{user}:{self.token(password)}@{hostport}"
        if not parts.query and netloc == parts.netloc:
            return url
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if not any(k in self.param_names for k, _ in pairs) and netloc == parts.netloc:
            return url
        query = urlencode([(k, self._param(k, v)) for k, v in pairs], safe=":")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def dsn(self, dsn: str) -> str:
        """A database DSN with its password replaced: URL form or libpq ``key=value`` form."""
        if "://" in dsn:
            return self.url(dsn)
        return _KV_PASSWORD.sub(lambda m: m["pre"] + self.token(m["pw"].strip("'")), dsn)

    def query(self, query: str) -> str:
        """A form-encoded body or query string with secret parameters replaced."""
        pairs = parse_qsl(query, keep_blank_values=True)
        if not any(k in self.param_names for k, _ in pairs):
            return query
        return urlencode([(k, self._param(k, v)) for k, v in pairs], safe=":")

    # --- bodies (JSON, forms), responses and errors -----------------------------------------

    def json(self, value: Any) -> Any:
        """A decoded JSON value (or codec tree) with configured fields replaced by tokens."""
        if self.json_anywhere:
            value = self._anywhere(value, self.json_anywhere)
        for path in self.json_paths:
            value = self._path(value, path)
        return value

    def document(self, value: Any) -> Any:
        """A Mongo document (codec tree) with the configured field names redacted at any depth."""
        return self._anywhere(value, self.field_names)

    def arguments(self, value: Any) -> Any:
        """Call arguments (a codec tree: a Celery task's args and kwargs) with secret-looking
        keyword names (``token``, ``api_key``, ``*_secret``...) redacted at any depth."""
        return self._anywhere(value, self.argument_names)

    def positional(self, args: list[Any], names: Sequence[str]) -> list[Any]:
        """Positional call arguments (a codec tree's list), each whose parameter in ``names``
        has a secret-looking name (as :meth:`arguments` tells) a token."""
        return [self._leaves_token(a) if i < len(names) and names[i] in self.argument_names
                else a for i, a in enumerate(args)]

    def _anywhere(self, node: Any, names: _NameSet) -> Any:
        if isinstance(node, dict):
            return {
                k: self._leaves_token(v) if k in names else self._anywhere(v, names)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [self._anywhere(x, names) for x in node]
        return node

    def _path(self, node: Any, segs: tuple[str, ...]) -> Any:
        if not segs:
            return node if node is None else self._any_token(node)
        if isinstance(node, list):  # lists are transparent: items.token reaches every item
            return [self._path(x, segs) for x in node]
        if not isinstance(node, dict):
            return node
        head, rest = segs[0], segs[1:]
        if head == "**":
            here = self._path(node, rest)
            return {k: self._path(v, segs) for k, v in here.items()} if isinstance(here, dict) else here
        glob = any(c in head for c in _GLOB_CHARS)
        low = head.lower()
        return {
            k: self._path(v, rest)
            if (fnmatch.fnmatchcase(k.lower(), low) if glob else k.lower() == low)
            else v
            for k, v in node.items()
        }

    def body(self, headers: Iterable[Any], body: bytes, partial: bool = False,
             response: bool = False) -> bytes:
        """An HTTP body with configured JSON fields / form parameters and seen secrets replaced.

        A content-encoded body (gzip, deflate; br and zstd where their module is installed)
        is decoded, redacted and encoded again; other bodies keep their bytes unless a secret
        seen earlier appears in them. ``partial``: the body is cut where the app stopped
        reading it; a content-encoded one is unpacked as far as its bytes go. One that
        unpacks past the limit is scanned a piece at a time (:meth:`_may_hide`): kept as it
        came when it holds nothing to redact; else a response raises :class:`Withheld`, and
        a request's body is withheld (see :data:`WITHHELD`), with a warning.
        """
        return self.body_parts(headers, body, partial, response)[0]

    def body_parts(self, headers: Iterable[Any], body: bytes, partial: bool = False,
                   response: bool = False) -> tuple[bytes, bytes | None]:
        """:meth:`body`, and for a content-encoded body it changed, its redacted bytes
        unpacked: the tokens packed inside differ with each process's redaction key, so a
        request key digests these instead (see ``keys.http_call``); for a request body
        withheld, an empty body and :data:`WITHHELD` (the very object). None otherwise."""
        if not body:
            return body, None
        ctype = encoding = ""
        for pair in headers:
            k, v = pair[0], pair[1]
            if k.lower() == "content-type":
                ctype = v.lower()
            elif k.lower() == "content-encoding":  # (several lines: one list, in order)
                encoding = f"{encoding}, {v}" if encoding else v.lower().strip()
        if encoding in ("", "identity"):
            return self._plain_body(ctype, body), None
        try:
            found = unpacked_codings(encoding, body, self.unpack_limit, partial)
        except TooLarge:
            if not self._may_hide(encoding, body, ctype):
                return body, None  # (scanned: nothing a redaction would change)
            if response:
                raise Withheld(encoding) from None
            _warn_once("withheld:" + encoding, "timetracer-otel: a %s-encoded request body "
                       "unpacks to more than %d bytes, too many to redact, and may hold a "
                       "secret; it is stored without its bytes, and a replay matches it by "
                       "method and URL only (TIMETRACER_MAX_UNPACKED_BYTES raises that limit).",
                       encoding, self.unpack_limit)
            return b"", WITHHELD
        if found is None:
            return body, None  # (another encoding, a broken stream: header and query rules still apply)
        plain, pack = found
        new = self._plain_body(ctype, plain)
        return (body, None) if new == plain else (pack(new), new)

    def _plain_body(self, ctype: str, body: bytes) -> bytes:
        mime = ctype.split(";")[0].strip()
        if (mime == "application/json" or mime.endswith("+json") or mime == "text/json"
                or mime.startswith("application/x-amz-json")) and (
            self._json_may_hit(body)
        ):
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            else:
                new_doc = self.json(doc)
                if new_doc != doc:
                    body = json.dumps(new_doc, ensure_ascii=False, separators=(",", ":")).encode()
        elif mime == "application/x-www-form-urlencoded":
            try:
                text = body.decode()
            except UnicodeDecodeError:
                text = None
            if text is not None:
                body = self.query(text).encode()
        return self.scrub_bytes(body)

    def _may_hide(self, codings: str, body: bytes, ctype: str = "") -> bool:
        """Whether a packed body too large to unpack whole may hold what a redaction would
        change: unpacked a piece at a time (memory stays bounded) and scanned for the
        secrets seen so far and the names a redaction acts on (JSON and document fields, and
        a form's parameters); yes, without a scan, for several codings, a coding it cannot
        unpack so, or rules by JSON path or by glob."""
        names = [c for c in (c.strip().lower() for c in codings.split(","))
                 if c not in ("", "identity")]
        if len(names) != 1 or self.json_paths or self.json_anywhere.globs \
                or self.field_names.globs:
            return True
        fields = [n.encode() for n in self.json_anywhere.exact | self.field_names.exact]
        if ctype.split(";")[0].strip() == "application/x-www-form-urlencoded":
            if self.param_names.globs:
                return True
            fields += [n.encode() for n in self.param_names.exact]
        anchors = _anchors(fields)
        overlap = max([len(a) for a in anchors] + [len(v.encode()) for v in self._seen],
                      default=0)
        tail = b""
        try:
            for piece in _unpacked_pieces(names[0], body):
                window = tail + piece
                if self.seen_in(window):
                    return True
                low = window.lower()
                for anchor in anchors:
                    if anchor in low:
                        return True
                tail = window[-overlap:] if overlap else b""
        except Exception:  # (a broken stream, no module): not known to be clean
            return True
        _warn_once("scanned:" + names[0], "timetracer-otel: a %s-encoded body unpacks to more "
                   "than %d bytes; scanned a piece at a time, it holds nothing to redact and "
                   "is stored as it came.", names[0], self.unpack_limit)
        return False

    def _json_may_hit(self, body: bytes) -> bool:
        # Parsing every JSON body costs more than the call it records; a byte scan for the
        # configured names (case-folded, as _NameSet matches) rules most bodies out.
        if self.json_paths or self.json_anywhere.globs:
            return True
        return self._has_json_anchor(body.lower())

    def _has_json_anchor(self, low: bytes) -> bool:
        for anchor in self._json_anchors:  # noqa: SIM110 - a plain loop, no generator per scan
            if anchor in low:
                return True
        return False

    def response_packed(self, tree: Any) -> tuple[Any, bytes]:
        """:meth:`response` and the msgpack of its result, which the span attribute stores.

        Most responses hold nothing to redact: one pack and a few C-speed scans of those bytes
        prove it, and the same bytes become the attribute (no walk, no second pack).
        """
        try:
            raw = _pack(tree)
        except (TypeError, ValueError, OverflowError):
            raw = None
        http = isinstance(tree, dict) and isinstance(tree.get("headers"), list)
        if raw is not None and not self._response_may_change(raw, http):
            chunks = tree.get("chunks") if http else None
            if not (isinstance(chunks, list) and len(chunks) > 1) or not self._response_may_change(
                b"".join(c for c in chunks if isinstance(c, bytes)), http
            ):  # a secret can straddle two chunks, which the packed bytes keep apart
                return tree, raw
        tree = self.response(tree)
        return tree, _pack(tree)

    def _response_may_change(self, raw: bytes, http: bool) -> bool:
        # A superset of what response() acts on, scanned over the whole packed tree: URLs,
        # passwords and seen secrets anywhere (what scrub() acts on); for an HTTP response
        # also encoded or form bodies and configured JSON paths and names.
        if b"://" in raw:
            return True
        low = raw.lower()
        if http:
            if self.json_paths or self.json_anywhere.globs:
                return True
            for mark in self._response_marks:
                if mark in low:
                    return True
        elif b"password" in low:
            return True
        return self.seen_in(raw)

    def response(self, tree: Any) -> Any:
        """A stored HTTP-like response (``headers`` plus ``body`` or ``chunks``) with its body
        redacted and ``Content-Length`` fixed; any other tree has seen secrets scrubbed."""
        if isinstance(tree, dict) and isinstance(tree.get("headers"), list):
            headers = tree["headers"]
            key = "body" if isinstance(tree.get("body"), bytes) else None
            if key is None and isinstance(tree.get("chunks"), list) and all(
                isinstance(c, bytes) for c in tree["chunks"]
            ):
                key = "chunks"
            if key is not None:
                old = tree[key] if key == "body" else b"".join(tree[key])
                # A body the app stopped reading, or that broke off (httpx's and botocore's
                # ``body_error``, requests' ``error``): unpacked as far as it goes, and its
                # stated length kept (a replay stops where it was cut).
                partial = bool(tree.get("body_open")) or tree.get("body_error") is not None \
                    or tree.get("error") is not None
                new = self.body(headers, old, partial=partial, response=True)
                if new != old:
                    tree = {**tree, key: new if key == "body" else [new]}
                    if not partial:
                        tree["headers"] = [
                            [h[0], str(len(new))] if str(h[0]).lower() == "content-length"
                            else h for h in headers
                        ]
                rest = self.scrub({k: v for k, v in tree.items() if k != key})
                return {k: tree[k] if k == key else rest[k] for k in tree}  # same key order
        return self.scrub(tree)

    def attributes(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """OTel span or event attributes: URL attributes through :meth:`url`, captured secret
        headers (``http.request.header.cookie``) tokenized, every string scrubbed."""
        special: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for k, v in attrs.items():
            if k.startswith(_HEADER_ATTRS) and k.rsplit(".", 1)[-1].replace("_", "-") in self.header_names:
                special[k] = [self._any_token(x) for x in v] if isinstance(v, list) else self._any_token(v)
            elif isinstance(v, str) and k in _URL_ATTRS:
                special[k] = self._after_url(self.url(v))
            elif isinstance(v, str) and k == "url.query":
                special[k] = self.text(self.query(v))
            else:
                rest[k] = v
        rest = self.scrub(rest)  # one scan of all the ordinary attributes, walked only on a hit
        return {k: special[k] if k in special else rest[k] for k in attrs}

    def span_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A span's status message and event attributes (exception messages) redacted; the
        fields themselves when there is neither (most spans)."""
        if fields.get("status_message") is None and not fields.get("events"):
            return fields
        out = dict(fields)
        if isinstance(out.get("status_message"), str):
            out["status_message"] = self.text(out["status_message"])
        events = out.get("events")
        if events:
            out["events"] = [
                msgspec.structs.replace(e, attributes=self.attributes(getattr(e, "attributes", {})))
                if isinstance(e, msgspec.Struct) else e
                for e in events
            ]
        return out

    def scrub(self, tree: Any) -> Any:
        """Every string and bytes leaf of ``tree`` with seen secrets (and DSN/URL passwords in
        text) replaced by their tokens."""
        if isinstance(tree, dict | list | tuple) and not self._may_hold_secrets(tree):
            return tree  # the common case: one C-speed scan instead of a walk with regexes
        return self._scrub(tree)

    def _scrub(self, tree: Any) -> Any:
        if isinstance(tree, str):
            return self.text(tree)
        if isinstance(tree, bytes):
            return self.scrub_bytes(tree)
        if isinstance(tree, dict):
            return {k: self._scrub(v) for k, v in tree.items()}
        if isinstance(tree, list | tuple):  # tuples: shared header rows (header_rows)
            return [self._scrub(x) for x in tree]
        return tree

    def _may_hold_secrets(self, tree: Any) -> bool:
        """Whether :meth:`text` or :meth:`scrub_bytes` could change any leaf of ``tree``: a
        URL (userinfo, query), the word password, or a secret seen before."""
        try:
            raw = _pack(tree)
        except (TypeError, ValueError, OverflowError):
            return True
        if b"://" in raw or b"password" in raw.lower():
            return True
        return self.seen_in(raw)

    def text(self, text: str) -> str:
        """Free text (an error message, a log line) with secrets replaced."""
        if "://" in text:
            text = _URL_USERINFO.sub(lambda m: m["pre"] + self.token(m["pw"]), text)
            if "?" in text:
                text = re.sub(
                    r"([?&])([^=&\s'\"]+)=([^&\s'\"#]*)",
                    lambda m: f"{m[1]}{m[2]}={self._param(m[2], m[3])}" if m[2] in self.param_names else m[0],
                    text,
                )
        if "password" in text.lower():
            text = _KV_PASSWORD.sub(lambda m: m["pre"] + self.token(m["pw"].strip("'")), text)
        return self._seen_replaced(text)

    def _after_url(self, text: str) -> str:
        # url() already tokenized userinfo and secret query parameters; what text() would add
        # is only a key=value password or a secret seen elsewhere.
        if "password" in text.lower():
            text = _KV_PASSWORD.sub(lambda m: m["pre"] + self.token(m["pw"].strip("'")), text)
        return self._seen_replaced(text)

    def scrub_bytes(self, data: bytes) -> bytes:
        if self._known is None or not data:
            return data
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return self._scrub_binary(data)
        new = self._seen_replaced(text)
        return data if new == text else new.encode()

    def _scrub_binary(self, data: bytes) -> bytes:
        """Bytes that are not UTF-8 text (a pickled or packed value, latin-1): each seen
        secret replaced by ``redacted:***...`` cut or padded to the secret's own length, so a
        length-prefixed format still parses. Not the token: keys see bytes as base64, where
        tokens cannot be folded, and a keyed hash would differ in every process."""
        known = self._known
        if known is not None and known.dirty:
            known = self._fresh(known, len(data))
        if known is None:
            return data
        if known.clean_data is not None:
            return known.clean_data.sub(lambda m: (_MASK + b"*" * len(m[0]))[:len(m[0])], data)
        seen = self._seen
        spans = _union_spans(data, known.data, known.recent_data, lambda v: v.decode() in seen)
        return _replaced(data, spans, lambda v: (_MASK + b"*" * len(v))[:len(v)]) if spans else data

    def _seen_replaced(self, text: str) -> str:
        """``text`` with every seen secret replaced by its token."""
        known = self._known
        if known is None:
            return text
        if known.clean_text is not None:  # the common case: one alternation of them all
            return known.clean_text.sub(lambda m: self._seen.get(m[0], m[0]), text)
        known = self._fresh(known, len(text))
        if known is None:
            return text
        seen = self._seen
        if known.clean_text is not None:
            return known.clean_text.sub(lambda m: seen.get(m[0], m[0]), text)
        spans = _union_spans(text, known.text, known.recent, seen.__contains__)
        return _replaced(text, spans, lambda v: seen.get(v, v)) if spans else text

    def seen_in(self, data: bytes) -> bool:
        """Whether a secret seen so far may occur in ``data`` (False before the first): never
        wrong when it says no; a secret forgotten since (see ``_SEEN_LIMIT``) may say yes."""
        known = self._known
        if known is None:
            return False
        pattern = known.clean_data
        if pattern is None:
            known = self._fresh(known, len(data))
            if known is None:
                return False
            pattern = known.data
            for secret in known.recent_data:
                if secret in data:
                    return True
        return pattern is not None and pattern.search(data) is not None

    def _fresh(self, known: _Known, size: int) -> _Known | None:
        """``known`` (not clean) for a scan of ``size`` characters, or a fresh compile of every
        secret seen when the recent ones are many (a quarter of the compiled ones) or their
        plain searches have cost about a compile already (ski rental: a compile of n secrets
        costs about as much as _RENT times n plain searches of a short payload). So compiling
        costs O(1) per secret learned or plain search made, amortized, and a recording that
        stops learning is back to one alternation (the fast path) after a few hundred scans."""
        recent = len(known.recent)
        rent = self._rent = self._rent + recent * (1 + size // 512) + 1
        compiled = len(known.compiled)
        if recent >= max(_RECENT_MIN, compiled // 4) or rent >= _RENT * (compiled + recent + 1):
            return self._rebuild(known)
        return known

    def _rebuild(self, known: _Known | None) -> _Known | None:
        """Compile every secret seen into one alternation, longest first (unless ``known`` was
        replaced meanwhile: the newer one is returned; None: compile anyway)."""
        with self._lock:
            if known is not None and self._known is not known:
                return self._known
            self._rent = 0
            if not self._seen:
                self._known = None
                return None
            alternation = "|".join(map(re.escape, sorted(self._seen, key=len, reverse=True)))
            new = self._known = _Known(re.compile(alternation), re.compile(alternation.encode()),
                                       frozenset(self._seen))
            return new

    def seen_pattern(self) -> re.Pattern[bytes] | None:
        """Every secret seen so far, as one pattern over bytes (None before the first).
        Compiles them if some are new: to test bytes for them, :meth:`seen_in` costs less."""
        known = self._known
        if known is None:
            return None
        if known.clean_data is None:
            known = self._rebuild(None)
        return known.clean_data if known is not None else None

    # --- SQL --------------------------------------------------------------------------------

    def sql_params(self, statement: str, tree: Any, positions: Iterable[int] = ()) -> Any:
        """A SQL parameter tree with redacted positions (0-based ``positions`` from the shim,
        plus the configured rules for ``statement``) and named parameters replaced."""
        pos = set(positions)
        names: set[str] = set()
        for rule in self.sql_rules:
            if rule.applies(statement):
                for p in rule.params:
                    if isinstance(p, int):
                        pos.add(p - 1)
                    else:
                        names.add(p.lower())
        if not pos and not names:
            return tree
        return self._sql(tree, pos, names)

    def _sql(self, tree: Any, pos: set[int], names: set[str]) -> Any:
        if isinstance(tree, dict) and len(tree) == 1 and "$tuple" in tree:
            return {"$tuple": self._sql(tree["$tuple"], pos, names)}
        if isinstance(tree, list):
            return [self._any_token(v) if i in pos and v is not None else v for i, v in enumerate(tree)]
        if isinstance(tree, dict):
            return {k: self._any_token(v) if k.lower() in names and v is not None else v
                    for k, v in tree.items()}
        return tree

def _extra(env: Mapping[str, str], var: str) -> list[str]:
    return [n.strip() for n in env.get(var, "").split(",") if n.strip()]

_default: Redactor | None = None
_default_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # (held by another thread at the fork, held for good)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

def default_redactor() -> Redactor:
    """The process-wide redactor, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Redactor()
        return _default

def set_default_redactor(redactor: Redactor | None) -> None:
    """Replace the process-wide redactor (None: rebuild from the environment on next use)."""
    global _default
    with _default_lock:
        _default = redactor
    _apply(redactor)

def configure(
    *,
    headers: Iterable[str] = (),
    params: Iterable[str] = (),
    json_paths: Iterable[str] = (),
    sql: Iterable[str | int | SqlRule | Mapping[str, Any]] = (),
    mongo_fields: Iterable[str] = (),
    key: bytes | str | None = None,
) -> Redactor:
    """Add redaction rules (on top of the defaults and the environment) for every shim.

    >>> timetracer_otel.redaction.configure(headers=["x-session"], json_paths=["user.ssn"],
    ...                                     sql=[{"statement": "INSERT INTO users*", "params": [3]}])
    """
    redactor = Redactor(
        headers=headers, params=params, json_paths=json_paths, sql=sql,
        mongo_fields=mongo_fields, key=key,
    )
    set_default_redactor(redactor)
    return redactor

def _apply(redactor: Redactor | None) -> None:
    # The shims read STATE.redactor; keep it the same object as the default.
    from timetracer_otel.replay_shims import base

    base.STATE.redactor = redactor if redactor is not None else default_redactor()
