"""The cassette schema: one set of msgspec Structs, encoded as msgpack or JSON.

A cassette is the spans of one recorded request or task (or of one plain process), each
dependency span carrying the request it made and the raw response or error it got back::

    >>> cassette = load_cassette("cassettes/2026-11-26/GET__users__4bf92f35.msgpack")
    >>> [s.library for s in cassette.spans if s.library]
    ['asyncpg', 'httpx']

The loader sniffs the content, not the file name, rejects unknown versions and verifies a
checksum, so a flipped byte is an error and never wrong data. Every hostile or damaged input
(truncated, oversized, too deeply nested, msgpack extension types, wrong key for an encrypted
cassette) is one :class:`CassetteError` line. With ``TIMETRACER_ENCRYPTION_KEY`` set, cassettes
are written encrypted (AES-256-GCM, see :mod:`timetracer_otel.crypto`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import hmac
import itertools
import math
import os
import queue
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from timetracer_otel import config, crypto
from timetracer_otel.errors import CassetteError, ConfigError

VERSION = 1
Format = config.Format
FORMATS: tuple[Format, ...] = ("msgpack", "json")
SUFFIX: dict[Format, str] = {"msgpack": ".msgpack", "json": ".json"}

# A cassette larger than this is refused before it is read or decoded: it is not a recording of
# one request, and decoding tiny containers ({} is 1 byte in msgpack, ~64 in memory) amplifies.
# TIMETRACER_MAX_CASSETTE_BYTES overrides it.
MAX_CASSETTE_BYTES = 256 * 1024 * 1024


def max_cassette_bytes() -> int:
    raw = os.environ.get("TIMETRACER_MAX_CASSETTE_BYTES", "").strip()
    if not raw:
        return MAX_CASSETTE_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"TIMETRACER_MAX_CASSETTE_BYTES={raw!r} is not a positive whole number of bytes.")
    return limit


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A span event (an exception recorded by the instrumentation, a log line)."""

    name: str
    time_ns: int
    attributes: dict[str, Any] = {}


class SpanRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One span. Dependency spans (``library`` set) are the interactions replay answers from.

    ``request`` is the canonical request the shim saw (a codec tree, redacted); ``response``
    the raw result as the driver got it; ``error`` the raised exception (type, message, args).
    """

    trace_id: str
    span_id: str
    parent_id: str | None = None
    remote_parent: bool = False
    name: str
    kind: str = "INTERNAL"
    start_ns: int = 0
    end_ns: int = 0
    status: str = "UNSET"
    status_message: str | None = None
    attributes: dict[str, Any] = {}
    events: list[Event] = []
    library: str | None = None
    key: str | None = None
    shape: str | None = None
    label: str | None = None
    request: Any = None
    response: Any = None
    error: Any = None
    truncated: bool = False

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


class Recorder(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What wrote the cassette: tool and library versions, how it was recorded."""

    tool: str = "timetracer-otel"
    version: str = ""
    via: str = "processor"  # processor | exporter | collector | pytest
    python: str = ""
    libraries: dict[str, str] = {}


class Cassette(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A recording: the spans of one trace (or one process) with their payloads."""

    # A factory, not a plain default: omit_defaults would leave a plain default out of the file,
    # and every cassette must say which schema it follows.
    version: int = msgspec.field(default_factory=lambda: VERSION)
    id: str
    name: str
    created: str
    resource: dict[str, Any] = {}
    recorder: Recorder = msgspec.field(default_factory=Recorder)
    complete: bool = True
    root: str | None = None
    spans: list[SpanRecord] = []
    checksum: str | None = None

    @property
    def interactions(self) -> list[SpanRecord]:
        """The dependency calls, in the order they started."""
        return sorted((s for s in self.spans if s.library), key=lambda s: s.start_ns)

    @property
    def root_span(self) -> SpanRecord | None:
        for span in self.spans:
            if span.span_id == self.root:
                return span
        return None


class SpanHead(msgspec.Struct, kw_only=True, gc=False):
    """What replay matching needs of a span; its payloads stay encoded until a call takes it.

    Decoding a large recording costs mostly its payload trees, and a replay uses few of them.
    """

    trace_id: str
    span_id: str
    name: str
    kind: str = "INTERNAL"
    start_ns: int = 0
    end_ns: int = 0
    library: str | None = None
    key: str | None = None
    shape: str | None = None
    label: str | None = None
    truncated: bool = False
    request: msgspec.Raw = msgspec.Raw()
    response: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()

    def materialize(self, source: str) -> SpanRecord:
        """The full :class:`SpanRecord`, payloads decoded (a damaged one is a CassetteError)."""
        try:
            with gc_paused():
                request, response, error = (
                    _PAYLOAD_DECODER.decode(raw) if len(raw) else None
                    for raw in (self.request, self.response, self.error)
                )
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise CassetteError(
                f"{source}: the recorded payload of {self.label or self.name} is corrupt "
                f"({_first_line(exc)}); record it again."
            ) from None
        return SpanRecord(
            trace_id=self.trace_id, span_id=self.span_id, name=self.name, kind=self.kind,
            start_ns=self.start_ns, end_ns=self.end_ns, library=self.library, key=self.key,
            shape=self.shape, label=self.label, truncated=self.truncated,
            request=request, response=response, error=error,
        )


class CassetteHeads(msgspec.Struct, kw_only=True):
    """A msgpack cassette decoded for replay: span heads only (see :func:`loads_for_replay`)."""

    version: int = msgspec.field(default_factory=lambda: VERSION)
    created: str = ""
    checksum: str | None = None
    spans: list[SpanHead] = []

    @property
    def interactions(self) -> list[SpanHead]:
        return sorted((s for s in self.spans if s.library), key=lambda s: s.start_ns)


class _Header(msgspec.Struct):
    version: Any = None


def reject_ext(code: int, data: memoryview) -> Any:
    """msgpack ``ext_hook`` for every tree we read: trees never hold extension types, and one
    in a cassette or a payload is damage or an attack."""
    raise ValueError(f"msgpack extension type {code} is not allowed in a cassette")


_JSON_ENCODER = msgspec.json.Encoder()
_MSGPACK_ENCODER = msgspec.msgpack.Encoder()
_JSON_DECODER = msgspec.json.Decoder(Cassette)
_MSGPACK_DECODER = msgspec.msgpack.Decoder(Cassette, ext_hook=reject_ext)
_HEADS_DECODER = msgspec.msgpack.Decoder(CassetteHeads, ext_hook=reject_ext)
_PAYLOAD_DECODER = msgspec.msgpack.Decoder(ext_hook=reject_ext)


def _checksum(cassette: Cassette) -> str:
    # Over the canonical JSON of everything but the checksum, so both encodings of one cassette
    # agree and a flipped byte anywhere (spans, completeness, root) is caught.
    body = msgspec.structs.replace(cassette, checksum=None, spans=[_json_stable(s) for s in cassette.spans])
    return "sha256:" + hashlib.sha256(_JSON_ENCODER.encode(body)).hexdigest()


def _json_stable(span: SpanRecord) -> SpanRecord:
    # JSON writes a non-finite float as null, which then reads back as the omitted default: a
    # payload that *is* inf/nan must hash like None, or a JSON cassette fails its own checksum.
    bad = {
        name: None
        for name in ("request", "response", "error")
        if isinstance(getattr(span, name), float) and not math.isfinite(getattr(span, name))
    }
    return msgspec.structs.replace(span, **bad) if bad else span


# msgpack cassettes (large, machine-written) are sealed over their own bytes: the file is
# encoded with this placeholder as its checksum, hashed, and the digest written in its place.
# Verifying is one hash pass, with no re-encoding. JSON cassettes keep the canonical hash, so
# re-indenting a reviewed JSON cassette does not break it.
_BYTES_ALGO = "sha256b:"
_PLACEHOLDER = (_BYTES_ALGO + "0" * 64).encode()


def _seal_bytes(data: bytes) -> bytes:
    at = data.rfind(_PLACEHOLDER)  # checksum is the last field, so its value comes last
    digest = _BYTES_ALGO + hashlib.sha256(data).hexdigest()
    return data[:at] + digest.encode() + data[at + len(_PLACEHOLDER):]


def _bytes_checksum_ok(data: bytes, checksum: str) -> bool:
    sealed = checksum.encode()
    at = data.rfind(sealed)
    if at < 0 or len(sealed) != len(_PLACEHOLDER):
        return False
    view = memoryview(data)
    h = hashlib.sha256(view[:at])
    h.update(_PLACEHOLDER)
    h.update(view[at + len(sealed):])
    return hmac.compare_digest(_BYTES_ALGO + h.hexdigest(), checksum)


def _decoded(cassette: Cassette) -> Cassette:
    """``cassette`` with payloads the writer kept as msgpack bytes (``msgspec.Raw``) decoded,
    for JSON, which cannot embed them."""
    if not any(type(v) is msgspec.Raw for s in cassette.spans
               for v in (s.request, s.response, s.error)):
        return cassette

    def tree(v: Any) -> Any:
        return _PAYLOAD_DECODER.decode(v) if type(v) is msgspec.Raw else v

    spans = [msgspec.structs.replace(s, request=tree(s.request), response=tree(s.response),
                                     error=tree(s.error)) for s in cassette.spans]
    return msgspec.structs.replace(cassette, spans=spans)


def dumps(cassette: Cassette, fmt: Format = "msgpack", *, encrypt: bool | None = None) -> bytes:
    """Encode ``cassette`` (with a fresh checksum) as msgpack or indented JSON; encrypted when
    ``TIMETRACER_ENCRYPTION_KEY`` is set (``encrypt=False``: never; ``True``: with that key,
    which must be set)."""
    if fmt == "json":
        cassette = _decoded(cassette)
        cassette = msgspec.structs.replace(cassette, checksum=_checksum(cassette))
        data = msgspec.json.format(_JSON_ENCODER.encode(cassette), indent=1) + b"\n"
    elif fmt == "msgpack":
        cassette = msgspec.structs.replace(cassette, checksum=_PLACEHOLDER.decode())
        data = _seal_bytes(_MSGPACK_ENCODER.encode(cassette))
    else:
        raise CassetteError(f"Unknown cassette format {fmt!r}; use one of: {', '.join(FORMATS)}.")
    key = crypto.env_key() if encrypt is not False else None
    if encrypt and key is None:
        raise ConfigError(f"Set {crypto.ENV_KEY} to write the encrypted cassette {cassette.name!r}.")
    return crypto.encrypt(data, key) if key is not None else data


def sniff(data: bytes) -> Format:
    """Tell msgpack from JSON by the first byte: a JSON object starts with ``{``."""
    head = data.lstrip()[:1]
    if head == b"{":
        return "json"
    if head and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    raise ValueError("neither a msgpack map nor a JSON object")


def loads(data: bytes, source: str = "<bytes>") -> Cassette:
    """Decode a cassette, checking size, format, version and checksum (decrypting first when
    it is encrypted).

    Raises :class:`CassetteError` with one sentence naming ``source`` and what is wrong, for
    any input whatsoever.

    >>> loads(dumps(cassette), "memory").id == cassette.id
    True
    """
    data, fmt = _prepare(data, source)
    cassette = _decode(_JSON_DECODER if fmt == "json" else _MSGPACK_DECODER, data, fmt, source)
    _verify(cassette, source, data)
    return cassette


def loads_for_replay(data: bytes, source: str = "<bytes>") -> Cassette | CassetteHeads:
    """Like :func:`loads`, for replay: a msgpack cassette sealed over its bytes is verified by
    one hash pass and decoded without its payloads (each is decoded when a call takes it).

    Other cassettes (JSON, older seals) decode fully.
    """
    data, fmt = _prepare(data, source)
    if fmt == "msgpack":
        heads = _decode(_HEADS_DECODER, data, fmt, source)
        if heads.checksum is not None and heads.checksum.startswith(_BYTES_ALGO):
            if not _bytes_checksum_ok(data, heads.checksum):
                raise _checksum_error(source)
            return heads
    cassette = _decode(_JSON_DECODER if fmt == "json" else _MSGPACK_DECODER, data, fmt, source)
    _verify(cassette, source, data)
    return cassette


def _prepare(data: bytes, source: str) -> tuple[bytes, Format]:
    """Size limit, decryption and format sniffing shared by every loader."""
    if not isinstance(data, bytes):
        data = bytes(data)
    limit = max_cassette_bytes()
    if len(data) > limit:
        raise CassetteError(
            f"{source}: cassette is {len(data)} bytes, over the {limit} byte limit; raise "
            "TIMETRACER_MAX_CASSETTE_BYTES if it is genuine."
        )
    if crypto.is_encrypted(data):
        data = crypto.decrypt(data, crypto.env_key(), source)
    try:
        return data, sniff(data)
    except ValueError:
        raise CassetteError(
            f"{source} is not a timetracer cassette (neither msgpack nor JSON); "
            "record it again or pass the right file."
        ) from None


_C = TypeVar("_C", Cassette, CassetteHeads)


def _decode(decoder: msgspec.json.Decoder[_C] | msgspec.msgpack.Decoder[_C], data: bytes,
            fmt: Format, source: str) -> _C:
    try:
        with gc_paused():
            cassette = decoder.decode(data)
    except RecursionError:
        raise CassetteError(f"{source} is nested too deeply to be a cassette; record it again.") from None
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        version = _peek_version(data, fmt)
        if version is not None and version != VERSION:
            raise _version_error(source, version) from None
        raise CassetteError(
            f"{source} is corrupt ({_first_line(exc)}); record it again or restore it."
        ) from None
    if cassette.version != VERSION:
        raise _version_error(source, cassette.version)
    return cassette


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many containers at once (decoding, indexing): its
    repeated passes over the new objects cost several times the work itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _verify(cassette: Cassette, source: str, data: bytes) -> None:
    if cassette.checksum is None:
        raise CassetteError(
            f"{source} has no checksum (it was not written by timetracer-otel, or was damaged); "
            "record it again or restore it."
        )
    try:
        if cassette.checksum.startswith(_BYTES_ALGO):
            ok = _bytes_checksum_ok(data, cassette.checksum)
        else:
            ok = hmac.compare_digest(cassette.checksum, _checksum(cassette))
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
        ok = False
    if not ok:
        raise _checksum_error(source)


def _checksum_error(source: str) -> CassetteError:
    return CassetteError(
        f"{source} failed its checksum (the file was changed or damaged after it was "
        "written); record it again or restore it."
    )


def _peek_version(data: bytes, fmt: Format) -> Any:
    try:
        if fmt == "json":
            return msgspec.json.decode(data, type=_Header).version
        return msgspec.msgpack.decode(data, type=_Header).version
    except Exception:  # only a hint for the message; loads reports the real problem
        return None


def _version_error(source: str, version: Any) -> CassetteError:
    if not isinstance(version, int) or isinstance(version, bool):
        return CassetteError(
            f"{source} has cassette version {version!r}, which is not a version number (this "
            f"timetracer-otel reads version {VERSION}); the file was not written by "
            "timetracer-otel or was edited: record it again or restore it."
        )
    return CassetteError(
        f"{source} has cassette version {version!r}, but this timetracer-otel reads version "
        f"{VERSION}; upgrade timetracer-otel or record it again."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_cassette(path: str | os.PathLike[str]) -> Cassette:
    """Read and decode the cassette at ``path`` (see :func:`loads`)."""
    return loads(_read(Path(path)), str(path))


def load_cassette_for_replay(path: str | os.PathLike[str]) -> Cassette | CassetteHeads:
    """Read the cassette at ``path`` for replay (see :func:`loads_for_replay`)."""
    return loads_for_replay(_read(Path(path)), str(path))


def _read(p: Path) -> bytes:
    limit = max_cassette_bytes()
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer forever.
        with open(os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(21, "Is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise CassetteError(f"{p} is not a regular file; pass a cassette file.")
            if st.st_size > limit:
                raise CassetteError(
                    f"{p}: cassette is {st.st_size} bytes, over the {limit} byte limit; raise "
                    "TIMETRACER_MAX_CASSETTE_BYTES if it is genuine."
                )
            data = fh.read(limit + 1)  # never more than the limit, even if the file grows
    except FileNotFoundError:
        raise CassetteError(f"{p}: no such cassette; check the path.") from None
    except IsADirectoryError:
        raise CassetteError(f"{p} is a directory; pass a cassette file.") from None
    except OSError as exc:
        raise CassetteError(f"{p} cannot be read ({exc.strerror or exc}).") from None
    return data


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    Temp file in the same directory, fsync, rename, then fsync the directory. A device, a
    pipe, a directory or a symbolic link at ``path`` is refused: the rename would replace it.
    """
    _replaceable(Path(path))
    [result] = atomic_write_many([(path, data)])
    if isinstance(result, CassetteError):
        raise result
    return result


def _replaceable(p: Path) -> None:
    """Refuse to replace anything at ``p`` but a regular file; a path that cannot be looked
    at (a directory without permission, a name too long) is one line, not an ``OSError``."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return  # a new file (its directory is made when missing)
    except OSError as exc:
        raise CassetteError(f"cannot write {p} ({exc.strerror or exc}); choose a path you can "
                            "write to.") from None
    if not stat.S_ISREG(st.st_mode):
        raise CassetteError(f"{p} exists and is not a regular file; give a file path to write to.")


def atomic_write_many(
    items: Sequence[tuple[str | os.PathLike[str], bytes]],
) -> list[Path | CassetteError]:
    """Write several files, each as :func:`atomic_write` does, with their fsyncs made together.

    Every temp file is written first, then all are fsynced at once (from a few threads, so the
    filesystem commits them in one journal transaction instead of one each), and only a file
    whose own fsync succeeded is renamed to its name: no file is ever visible under its name
    before its bytes are durable. Each directory is fsynced once, after its renames.

    One result per item, in order: the path written, or the :class:`CassetteError` that kept
    it from being written (its temp file removed). Never raises for one file's failure.
    """
    done = write_files([(os.fspath(path), data) for path, data in items])
    return [r if isinstance(r, CassetteError) else Path(r) for r in done]


def write_files(items: Sequence[tuple[str, bytes]]) -> list[str | CassetteError]:
    """:func:`atomic_write_many` on path strings, returning them (no ``Path`` per file: the
    cassette writer's thread calls this for every batch)."""
    results: list[str | CassetteError] = []
    staged: list[_Staged] = []
    new_dirs: set[str] = set()
    checked: set[str] = set()  # one stat per directory and batch, not one per file
    try:
        for i, (p, data) in enumerate(items):
            results.append(p)
            try:
                parent = os.path.dirname(p) or "."
                if parent not in checked:
                    if not os.path.isdir(parent):
                        os.makedirs(parent, exist_ok=True)
                        new_dirs.add(parent)
                    checked.add(parent)
                fd, tmp = _temp_file(parent, os.path.basename(p))
            except OSError as exc:
                results[i] = CassetteError(
                    f"cannot write {p} ({exc.strerror or exc}); choose a writable directory."
                )
                continue
            item = _Staged(i, p, parent, tmp, fd)
            staged.append(item)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                item.fail(exc)
        pending = [(s, s.fd) for s in staged if s.fd is not None]
        for (item, _), error in zip(pending, _fsync_all([fd for _, fd in pending]), strict=True):
            if error is not None:
                item.fail(error)
        synced: set[str] = set()
        for item in staged:
            item.close()
            if item.error is None and item.tmp is not None:
                try:
                    os.replace(item.tmp, item.path)
                    item.tmp = None
                    synced.add(item.parent)
                except OSError as exc:
                    item.fail(exc)
            if item.error is not None:
                results[item.index] = CassetteError(
                    f"cannot write {item.path} ({item.error.strerror or item.error}); free space "
                    "there or choose another path."
                )
        # The renames, and a directory made for them, are durable once their directories are.
        for d in sorted(synced) + sorted({os.path.dirname(d) for d in new_dirs & synced}):
            _fsync_dir(d)
    finally:
        for item in staged:  # only after an interruption is anything left to clean up
            item.close()
            if item.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(item.tmp)
                item.tmp = None
            _IN_FLIGHT.discard(item.made)
    return results


# The temp files write_files has open, for remove_temp_files.
_IN_FLIGHT: set[str] = set()


def remove_temp_files() -> None:
    """Remove the temp files of writes still in progress, for a process about to end with
    ``os._exit`` in the middle of them (``collect`` given a second signal): their cassettes
    are not written, and no ``.tmp`` file is left beside the others."""
    for tmp in list(_IN_FLIGHT):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | \
    getattr(os, "O_BINARY", 0)


_temp_names = itertools.count()


def _temp_file(parent: str, name: str) -> tuple[int, str]:
    """A new file ``.<name>.<pid>-<n>.tmp`` in ``parent``, open for writing, mode 0600: what
    ``tempfile.mkstemp`` makes, without its Python-level name generator and without a random
    name (``os.urandom`` is a system call: one more wait for the GIL per cassette on the
    writer thread); ``O_EXCL`` still refuses a name in use, and the next number is tried."""
    for _ in range(100):
        tmp = os.path.join(parent, f".{name}.{os.getpid()}-{next(_temp_names)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {parent}")


class _Staged:
    """A temp file of :func:`atomic_write_many` on its way to its name."""

    __slots__ = ("error", "fd", "index", "made", "parent", "path", "tmp")

    def __init__(self, index: int, path: str, parent: str, tmp: str, fd: int) -> None:
        self.index = index
        self.path = path
        self.parent = parent
        self.made = tmp
        _IN_FLIGHT.add(tmp)
        self.tmp: str | None = tmp
        self.fd: int | None = fd
        self.error: OSError | None = None

    def fail(self, error: OSError) -> None:
        self.error = self.error or error
        self.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError as exc:  # a deferred write error (NFS): the bytes are not safe
                self.error = self.error or exc


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the files themselves are durable


def _fsync_all(fds: list[int]) -> list[OSError | None]:
    """``os.fsync`` every fd, concurrently when there are several; the error of each."""
    if len(fds) <= 1:
        return [_fsync_one(fd) for fd in fds]
    return _FSYNC_POOL.run(fds)


def _fsync_one(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


class _FsyncPool:
    """A few daemon threads that fsync for :func:`atomic_write_many` (started on first use,
    and again in a forked child, where the parent's threads do not exist)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pid = -1
        self._jobs: queue.SimpleQueue[tuple[int, list[OSError | None], int, threading.Semaphore]]
        self._lock = threading.Lock()

    def run(self, fds: list[int]) -> list[OSError | None]:
        if self._pid != os.getpid() and not self._start():
            # No thread can start (interpreter shutdown, where an atexit flush runs on 3.12+):
            # the same fsyncs, one after another, rather than losing the batch.
            return [_fsync_one(fd) for fd in fds]
        results: list[OSError | None] = [None] * len(fds)
        done = threading.Semaphore(0)
        for i, fd in enumerate(fds):
            self._jobs.put((fd, results, i, done))
        for _ in fds:
            done.acquire()
        return results

    def _start(self) -> bool:
        """Start the threads; False when not even one could start."""
        with self._lock:
            if self._pid == os.getpid():
                return True
            jobs: queue.SimpleQueue[tuple[int, list[OSError | None], int, threading.Semaphore]]
            jobs = queue.SimpleQueue()
            started = 0
            for n in range(self.size):
                try:
                    threading.Thread(target=self._work, args=(jobs,), daemon=True,
                                     name=f"timetracer-fsync-{n}").start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    break
                started += 1
            if not started:
                return False
            self._jobs = jobs
            self._pid = os.getpid()  # only now: a pool with no thread would wait forever
            return True

    @staticmethod
    def _work(
        jobs: queue.SimpleQueue[tuple[int, list[OSError | None], int, threading.Semaphore]],
    ) -> None:
        while True:
            fd, results, i, done = jobs.get()
            results[i] = _fsync_one(fd)
            done.release()


_FSYNC_POOL = _FsyncPool(8)


def save_cassette(cassette: Cassette, path: str | os.PathLike[str], fmt: Format | None = None) -> Path:
    """Encode and atomically write ``cassette``; the format defaults from the file suffix."""
    p = Path(path)
    _replaceable(p)
    return atomic_write(p, dumps(cassette, fmt or _format_of(p)))


def _format_of(p: Path) -> Format:
    suffix = p.suffix.lower()
    if suffix not in (".json", ".msgpack"):
        raise CassetteError(
            f"{p}: the format cannot be told from the suffix {p.suffix or '(none)'!r}; "
            "name the file .json or .msgpack, or give the format."
        )
    return "json" if suffix == ".json" else "msgpack"


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` (flock on its descriptor) between processes."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def recorder(via: str) -> Recorder:
    """This tool's version and Python's, for a cassette written outside the span writer."""
    import importlib.metadata
    import platform

    try:
        version = importlib.metadata.version("timetracer-otel")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return Recorder(version=version, via=via, python=platform.python_version())


def add_to_file(path: str | os.PathLike[str], spans: Sequence[SpanRecord],
                known: Mapping[str, int] | None = None, *, by_start: bool = False,
                drop: Set[str] = frozenset(), complete: bool = True) -> Path | None:
    """Add ``spans`` to the cassette file at ``path`` (see :func:`with_interactions`): read,
    add and replace under an exclusive lock on its directory, so processes and threads
    adding at once lose nothing; a link is followed to the cassette itself. Returns the file,
    or None when nothing was left to add."""
    p = Path(path).resolve()
    with locked(p.parent):
        data = with_interactions(_read(p), str(p), _format_of(p), spans, known, by_start=by_start,
                                 drop=drop, complete=complete)
        return None if data is None else atomic_write(p, data)


def with_interactions(raw: bytes, source: str, fmt: Format, spans: Sequence[SpanRecord],
                      known: Mapping[str, int] | None, *, by_start: bool = False,
                      drop: Set[str] = frozenset(), complete: bool = True) -> bytes | None:
    """The cassette ``raw`` (read from ``source``) with ``spans`` added, less those others
    added since ``known`` was read (see :func:`not_added_yet`), encoded in ``fmt`` and
    encrypted only if it was; None when nothing is left to add. Added at the end (calls a
    replay made live, after the recording), or with ``by_start`` where they started (spans of
    the same run that came late). The spans whose ids are in ``drop`` are removed (calls a
    new episode replaced). ``complete=False``: the cassette says ``complete: false`` from
    now on (spans whose parent never came: the recording lacks that parent); it never turns
    an incomplete cassette complete."""
    cassette = loads(raw, source)
    new = not_added_yet(spans, known, cassette.interactions)
    if not new:
        return None
    if not complete:
        cassette.complete = False
    kept = [s for s in cassette.spans if s.span_id not in drop] if drop else cassette.spans
    cassette.spans = [*kept, *new]
    if by_start:
        cassette.spans.sort(key=lambda s: s.start_ns)
    # Encrypted only if it was: a plaintext cassette stays readable without the key.
    return dumps(cassette, fmt, encrypt=crypto.is_encrypted(raw))


def appended_cassette(spans: Sequence[SpanRecord], via: str, fmt: Format) -> tuple[Cassette, str]:
    """A cassette of calls recorded live during a replay, to put beside the replayed ones,
    and its file name (``appended-<time>-<id>`` in ``fmt``)."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    token = os.urandom(4).hex()
    cassette = Cassette(id=token, name="appended", created=now.isoformat(),
                        recorder=recorder(via), spans=list(spans))
    return cassette, f"appended-{now:%Y%m%dT%H%M%S}-{token}{SUFFIX[fmt]}"


def not_added_yet(
    spans: Sequence[SpanRecord], known: Mapping[str, int] | None,
    there: Sequence[SpanRecord | SpanHead],
) -> list[SpanRecord]:
    """``spans`` less, per key, as many as were added to ``there`` since ``known`` was read:
    ``known`` counts the interactions of each key a replay loaded, so calls that others added
    since (another run of the same replay, another process) are not added again, and two runs
    that both lacked a call leave it in the cassette once. Without ``known``, all of them."""
    if known is None:
        return list(spans)
    extra: dict[str | None, int] = {}
    for span in there:
        extra[span.key] = extra.get(span.key, 0) + 1
    for key, count in known.items():
        extra[key] = extra.get(key, 0) - count
    new = []
    for span in spans:
        if extra.get(span.key, 0) > 0:
            extra[span.key] -= 1  # someone added this one already
        else:
            new.append(span)
    return new


def find_cassettes(path: str | os.PathLike[str], *,
                   unreadable: list[str] | None = None) -> list[Path]:
    """The cassette files at ``path``: the file itself, or every cassette below a directory
    (symbolic links to files followed, to directories not; names starting with ``.`` left out).

    A directory below ``path`` that cannot be listed (its permissions) raises
    :class:`CassetteError` naming it, since its cassettes would be left out; given
    ``unreadable``, a line saying so is added there instead and the search goes on (the
    caller shows it).
    A path that cannot be looked at (permissions, a name too long) raises, one line."""
    p = Path(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise CassetteError(f"{p}: no such cassette or directory; check the path.") from None
    except OSError as exc:
        raise CassetteError(_unreachable(p, exc)) from None
    if stat.S_ISREG(st.st_mode):
        return [p]
    if not stat.S_ISDIR(st.st_mode):
        raise CassetteError(f"{p} is not a regular file; pass a cassette file or a directory.")
    found: list[Path] = []
    skipped: list[tuple[Path, OSError]] = []
    pending = [p]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            if directory == p:  # the directory asked for: nothing at all can be read
                raise CassetteError(_unreachable(p, exc)) from None
            skipped.append((directory, exc))
            continue
        for entry in entries:
            child = directory / entry.name
            if _is_real_dir(entry):
                pending.append(child)
            elif not entry.name.startswith(".") and child.suffix.lower() in (".msgpack", ".json") \
                    and _is_file_or_unknown(entry):
                found.append(child)
    skipped.sort(key=lambda item: item[0])
    if skipped and unreadable is None:
        (first, error), more = skipped[0], len(skipped) - 1
        also = f" (and {more} more)" if more else ""
        raise CassetteError(
            f"{first}{also} cannot be read ({error.strerror or error}), so the cassettes in it "
            "would be left out; fix its permissions or pass a path without it."
        )
    if unreadable is not None:
        unreadable.extend(f"{d} cannot be read ({error.strerror or error}), so the cassettes in "
                          "it are left out; fix its permissions." for d, error in skipped)
    return sorted(found)


def _unreachable(p: Path, exc: OSError) -> str:
    return f"{p} cannot be read ({exc.strerror or exc}); check the path and its permissions."


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    """A directory, not a link to one (no loops); False when its type cannot be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_file_or_unknown(entry: os.DirEntry[str]) -> bool:
    """A file or a link to one; True when that cannot be told (reading it says why not)."""
    try:
        return entry.is_file()
    except OSError:
        return True
