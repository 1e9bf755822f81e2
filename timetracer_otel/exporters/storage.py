"""Where cassettes go and where they are read from: a local directory (atomic writes) or an
S3-compatible bucket (``s3://bucket/prefix``), behind one small API.

    >>> storage_for("s3://recordings/nightly").write("2026-11-26/job__ab12.msgpack", data)
    >>> [name for name, _ in load_sources("s3://recordings/nightly")]
    ['s3://recordings/nightly/2026-11-26/job__ab12.msgpack']
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from timetracer_otel.cassette import (
    Cassette,
    CassetteHeads,
    Format,
    SpanHead,
    SpanRecord,
    _read,
    add_to_file,
    appended_cassette,
    atomic_write,
    dumps,
    find_cassettes,
    load_cassette,
    load_cassette_for_replay,
    loads,
    loads_for_replay,
    locked,
    not_added_yet,
    with_interactions,
    write_files,
)
from timetracer_otel.errors import CassetteError

if TYPE_CHECKING:
    from timetracer_otel.exporters.s3 import S3Storage


class Storage(Protocol):
    def write(self, relpath: str, data: bytes) -> str:
        """Store ``data`` at ``relpath`` atomically; return where it went."""
        ...

    def check(self) -> None:
        """Raise :class:`CassetteError` if nothing can be written here."""
        ...


class LocalStorage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def write(self, relpath: str, data: bytes) -> str:
        return str(atomic_write(self.root / relpath, data))

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> list[str | Exception]:
        """Several cassettes at once, each atomically, their fsyncs made together (see
        :func:`~timetracer_otel.cassette.atomic_write_many`): where each went, or its error."""
        if type(self).write is not LocalStorage.write:  # a subclass decides how one is written
            return [_one(self.write, relpath, data) for relpath, data in items]
        root = os.fspath(self.root)
        return list(write_files([(os.path.join(root, relpath), data) for relpath, data in items]))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".timetracer-write-check"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CassetteError(
                f"cannot write cassettes to {self.root} ({exc.strerror}); "
                "choose a writable directory with --dir or TIMETRACER_DIR."
            ) from None

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"


def _one(write: Callable[[str, bytes], str], relpath: str, data: bytes) -> str | Exception:
    try:
        return write(relpath, data)
    except Exception as exc:
        return exc


def write_many(storage: Storage, items: Sequence[tuple[str, bytes]]) -> list[str | Exception]:
    """``storage.write_many`` where the storage has it, else one ``write`` after another; one
    result per item (where it went, or the exception that stopped it), never raising."""
    many = getattr(storage, "write_many", None)
    if many is not None:
        try:
            return list(many(items))
        except Exception as exc:
            return [exc] * len(items)
    return [_one(storage.write, relpath, data) for relpath, data in items]


def storage_for(location: str | Path) -> Storage:
    """The storage for a ``--dir`` / ``TIMETRACER_DIR`` value."""
    text = str(location)
    if text.startswith("s3://"):
        from timetracer_otel.exporters.s3 import S3Storage

        return S3Storage(text)
    return LocalStorage(text)


def is_remote(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def source_names(location: str | Path) -> list[str]:
    """The cassettes at ``location``: a file or object itself, or every cassette below a
    directory or prefix (sorted)."""
    text = str(location)
    if not is_remote(text):
        return [str(p) for p in find_cassettes(text)]
    from timetracer_otel.exporters.s3 import SUFFIXES, S3Storage

    storage = S3Storage(text)
    if text.endswith(SUFFIXES) and storage.exists(text):
        return [text]
    names = storage.list()
    if not names:
        raise CassetteError(f"{text}: no cassettes there; check the bucket and prefix.")
    return names


def read_sources(location: str | Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every cassette at ``location`` (local path or ``s3://``); a file
    is read as :func:`read_source` reads it."""
    text = str(location)
    if not is_remote(text):
        return [(name, read_source(name)) for name in source_names(text)]
    from timetracer_otel.exporters.s3 import S3Storage

    storage = S3Storage(text)
    return [(name, storage.read(name)) for name in source_names(text)]


def read_source(name: str) -> bytes:
    """The bytes of one cassette, a file or an ``s3://`` object: a file is refused past the
    cassette size limit before it is read (``TIMETRACER_MAX_CASSETTE_BYTES``)."""
    if not is_remote(name):
        return _read(Path(name))
    from timetracer_otel.exporters.s3 import S3Storage

    return S3Storage(name).read(name)


def load_sources(location: str | Path) -> list[tuple[str, Cassette]]:
    """Decoded cassettes at ``location``; each error names its file or object."""
    if not is_remote(location):
        return [(str(p), load_cassette(p)) for p in find_cassettes(location)]
    return [(name, loads(data, name)) for name, data in read_sources(location)]


def load_replay_sources(location: str | Path) -> list[tuple[str, Cassette | CassetteHeads]]:
    """Like :func:`load_sources`, for replay: large msgpack cassettes keep their payloads
    encoded until a call takes them (see :func:`cassette.loads_for_replay`)."""
    if not is_remote(location):
        return [(str(p), load_cassette_for_replay(p)) for p in find_cassettes(location)]
    return [(name, loads_for_replay(data, name)) for name, data in read_sources(location)]


def load_replay_source(name: str) -> Cassette | CassetteHeads:
    """One cassette (a file or an ``s3://`` object) as :func:`load_replay_sources` loads it."""
    if not is_remote(name):
        return load_cassette_for_replay(name)
    from timetracer_otel.exporters.s3 import S3Storage

    return loads_for_replay(S3Storage(name).read(name), name)


def load_one(location: str | Path) -> Cassette:
    """The single cassette at ``location`` (a file or an ``s3://`` object)."""
    if not is_remote(location):
        return load_cassette(location)
    from timetracer_otel.exporters.s3 import S3Storage

    return loads(S3Storage(str(location)).read(str(location)), str(location))


# Another writer replaced the object between our read and our conditional write: read again.
_REPLACE_TRIES = 5


def add_interactions(
    source: str | os.PathLike[str],
    spans: Sequence[SpanRecord],
    via: str,
    fmt: Format = "msgpack",
    known: Mapping[str, int] | None = None,
    *,
    by_start: bool = False,
    complete: bool = True,
) -> str | None:
    """Keep the calls a replay recorded live (``on_miss="record"``) where the next replay of
    ``source`` finds them. A cassette file gets them added under a lock (``add_to_file``), an
    ``s3://`` object by a conditional write (read again if another writer replaced it
    meanwhile); both keep the cassette's own format and encryption. A directory or an
    ``s3://`` prefix gets a new ``appended-...`` cassette in ``fmt`` beside the others.
    ``known``: see :func:`~timetracer_otel.cassette.not_added_yet`; ``by_start`` and
    ``complete`` (a cassette file or object): see
    :func:`~timetracer_otel.cassette.with_interactions`. Returns where they went, or None
    when nothing was left to add."""
    text = os.fspath(source)
    if is_remote(text):
        from timetracer_otel.exporters.s3 import SUFFIXES, S3Storage

        storage = S3Storage(text)
        if text.endswith(SUFFIXES) and storage.exists(text):
            return _add_to_object(storage, text, spans, known, by_start, complete)
        return _add_beside(storage, text, spans, via, fmt, known)
    p = Path(text)
    if p.is_file():
        path = add_to_file(p, spans, known, by_start=by_start, complete=complete)
        return None if path is None else str(path)
    if p.is_dir():
        with locked(p):
            return _add_beside(LocalStorage(p), text, spans, via, fmt, known)
    raise CassetteError(f"{source} is not a cassette file or directory, so the {len(spans)} "
                        "call(s) recorded live were not kept; replay from one path.")


def _add_to_object(storage: S3Storage, url: str, spans: Sequence[SpanRecord],
                   known: Mapping[str, int] | None, by_start: bool = False,
                   complete: bool = True) -> str | None:
    fmt: Format = "json" if url.lower().endswith(".json") else "msgpack"
    for _ in range(_REPLACE_TRIES):
        raw, etag = storage.read_tagged(url)
        data = with_interactions(raw, url, fmt, spans, known, by_start=by_start,
                                 complete=complete)
        if data is None:
            return None
        if storage.replace(url, data, etag):
            return url
    raise CassetteError(f"{url} kept being replaced by other writers, so the {len(spans)} "
                        "call(s) recorded live were not kept; replay again to record them.")


def _add_beside(storage: Storage, location: str, spans: Sequence[SpanRecord], via: str,
                fmt: Format, known: Mapping[str, int] | None) -> str | None:
    """A new cassette of ``spans`` (less those others added since, counted from the heads of
    every cassette at ``location`` that can be read) written into ``storage``."""
    there: list[SpanRecord | SpanHead] = []
    if known is not None:
        for name in _names_or_none(location):
            with contextlib.suppress(CassetteError):  # one that cannot be read adds nothing
                there.extend(load_replay_source(name).interactions)
    new = not_added_yet(spans, known, there)
    if not new:
        return None
    cassette, name = appended_cassette(new, via, fmt)
    return storage.write(name, dumps(cassette, fmt))


def _names_or_none(location: str) -> list[str]:
    try:
        return source_names(location)
    except CassetteError:  # (an empty prefix)
        return []
