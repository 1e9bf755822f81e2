"""One schema, two encodings; the loader sniffs content, rejects bad files with one line."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from timetracer_otel.cassette import (
    VERSION,
    Cassette,
    SpanRecord,
    dumps,
    find_cassettes,
    load_cassette,
    loads,
    save_cassette,
)
from timetracer_otel.codec import from_tree, to_tree
from timetracer_otel.errors import CassetteError


def sample() -> Cassette:
    span = SpanRecord(
        trace_id="a" * 32,
        span_id="b" * 16,
        name="GET",
        kind="CLIENT",
        start_ns=1,
        end_ns=5,
        library="httpx",
        key="httpx:abc",
        shape="httpx:def",
        label="GET http://x/",
        request={"method": "GET", "body": b"\x00\x01"},
        response={"value": to_tree((Decimal("1.5"), dt.date(2026, 1, 2)))},
        attributes={"http.method": "GET", "list": [1, 2]},
    )
    return Cassette(id="c1", name="test", created="2026-11-26T00:00:00+00:00", spans=[span])


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_both_encodings_round_trip_and_are_sniffed_by_content(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "no-suffix"
    save_cassette(sample(), path, fmt)  # type: ignore[arg-type]
    loaded = load_cassette(path)
    span = loaded.spans[0]
    assert loaded.version == VERSION and loaded.checksum is not None
    assert from_tree(span.response["value"]) == (Decimal("1.5"), dt.date(2026, 1, 2))
    assert type(from_tree(span.response["value"])) is tuple
    body = span.request["body"]
    # msgpack keeps bytes; JSON carries base64 text that the shims read back with as_bytes.
    assert body == b"\x00\x01" if fmt == "msgpack" else body == "AAE="
    first = path.read_bytes()[0]
    assert first == ord("{") if fmt == "json" else (0x80 <= first <= 0x8F or first in (0xDE, 0xDF))


def test_msgpack_is_sealed_over_its_bytes_json_over_its_content() -> None:
    c = sample()
    packed = dumps(c, "msgpack")
    assert msgspec.msgpack.decode(packed)["checksum"].startswith("sha256b:")
    assert dumps(c, "msgpack") == packed  # deterministic: same cassette, same bytes
    # A reviewed JSON cassette may be re-indented by an editor and still load.
    text = dumps(c, "json")
    assert msgspec.json.decode(text)["checksum"].startswith("sha256:")
    reindented = msgspec.json.format(text, indent=4)
    assert loads(reindented, "reindented.json").spans == loads(text, "x.json").spans


def test_every_flipped_byte_of_a_msgpack_cassette_is_refused_or_harmless() -> None:
    packed = dumps(sample(), "msgpack")
    original = loads(packed, "x")
    for i in range(len(packed)):
        damaged = bytearray(packed)
        damaged[i] ^= 0x01
        try:
            got = loads(bytes(damaged), "x")
        except CassetteError:
            continue
        assert got == original, f"byte {i} changed the data without an error"


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_a_flipped_byte_in_a_payload_is_a_checksum_error(fmt: str) -> None:
    data = bytearray(dumps(sample(), fmt))  # type: ignore[arg-type]
    needle = b"GET http://x/"
    at = data.index(needle)
    data[at] = ord("P")
    with pytest.raises(CassetteError, match="checksum"):
        loads(bytes(data), "x.cassette")


def test_future_version_is_named() -> None:
    raw = msgspec.json.decode(dumps(sample(), "json"))
    raw["version"] = VERSION + 1
    with pytest.raises(CassetteError, match=rf"version {VERSION + 1}.*upgrade timetracer-otel"):
        loads(msgspec.json.encode(raw), "future.json")


def test_future_version_with_an_unknown_shape_is_still_a_version_error() -> None:
    data = msgspec.json.encode({"version": 99, "spans": "a new layout"})
    with pytest.raises(CassetteError, match="version 99"):
        loads(data, "future.json")


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"{not json", b"\x81\xa7version", b"\x93\x01\x02\x03", b'{"version": 1}'],
)
def test_corrupt_input_is_one_line(data: bytes) -> None:
    with pytest.raises(CassetteError) as info:
        loads(data, "bad.msgpack")
    message = str(info.value)
    assert "bad.msgpack" in message and "\n" not in message


def test_missing_file_and_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(CassetteError, match="no such cassette"):
        load_cassette(tmp_path / "nope.msgpack")
    with pytest.raises(CassetteError, match="is a directory"):
        load_cassette(tmp_path)
    with pytest.raises(CassetteError, match="no such cassette or directory"):
        find_cassettes(tmp_path / "nope")


def test_atomic_write_leaves_old_file_or_new_never_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.msgpack"
    save_cassette(sample(), path)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    bigger = sample()
    bigger.spans[0].label = "changed"
    with pytest.raises(CassetteError, match="No space left"):
        save_cassette(bigger, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.msgpack"]  # no temp file left behind


def test_a_process_giving_up_mid_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """collect given a second signal ends with os._exit while cassettes are being written:
    remove_temp_files (what it calls first) leaves neither a .tmp file nor a half cassette."""
    import threading

    from timetracer_otel import cassette as module

    in_fsync, release = threading.Event(), threading.Event()
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # the write is in flight: bytes out, not yet durable
        in_fsync.set()
        release.wait(10)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    done: list[object] = []
    writing = threading.Thread(target=lambda: done.append(
        module.write_files([(str(tmp_path / f"c{i}.msgpack"), b"x" * 100_000) for i in range(3)])))
    writing.start()
    assert in_fsync.wait(10)
    assert len(list(tmp_path.glob(".*.tmp"))) == 3
    module.remove_temp_files()
    assert list(tmp_path.iterdir()) == []
    release.set()
    writing.join(10)
    assert list(tmp_path.iterdir()) == []  # the renames failed: no cassette under its name
    assert all(isinstance(r, CassetteError) for r in done[0])  # type: ignore[attr-defined]


def test_unwritable_directory_is_a_cassette_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CassetteError, match="cannot write"):
        save_cassette(sample(), blocker / "sub" / "c.msgpack")


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_every_file_states_its_schema_version(fmt: str) -> None:
    data = dumps(sample(), fmt)  # type: ignore[arg-type]
    raw = msgspec.json.decode(data) if fmt == "json" else msgspec.msgpack.decode(data)
    assert raw["version"] == VERSION


def test_replay_loads_msgpack_heads_and_decodes_payloads_when_taken(tmp_path: Path) -> None:
    from timetracer_otel.cassette import CassetteHeads, load_cassette_for_replay
    from timetracer_otel.index import ReplayIndex
    from timetracer_otel.keys import Call

    path = tmp_path / "c.msgpack"
    save_cassette(sample(), path)
    heads = load_cassette_for_replay(path)
    assert isinstance(heads, CassetteHeads)  # payloads not decoded yet
    index = ReplayIndex.from_paths([path])
    span = sample().spans[0]
    call = Call("httpx", span.request, {}, {}, "GET http://x/", _key=span.key, _shape_key=span.shape)
    match = index.take(call)
    assert match is not None and match.span.request == {"method": "GET", "body": b"\x00\x01"}
    assert from_tree(match.span.response["value"]) == (Decimal("1.5"), dt.date(2026, 1, 2))
    # JSON cassettes decode fully, as before.
    save_cassette(sample(), tmp_path / "c.json")
    assert isinstance(load_cassette_for_replay(tmp_path / "c.json"), Cassette)


def test_a_resealed_cassette_with_a_damaged_payload_fails_cleanly(tmp_path: Path) -> None:
    """A hostile file can carry a self-made seal; its payloads must still fail cleanly."""
    from timetracer_otel import cassette as cm
    from timetracer_otel.index import ReplayIndex
    from timetracer_otel.keys import Call

    c = sample()
    c.spans[0].response = {"value": "abc"}
    data = cm.dumps(c, "msgpack")
    checksum = msgspec.msgpack.decode(data)["checksum"].encode()
    data = data.replace(checksum, cm._PLACEHOLDER)

    def sealed(name: str, payload: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(cm._seal_bytes(data.replace(b"\xa5value\xa3abc", b"\xa5value" + payload)))
        return path

    # Malformed msgpack is found while loading, before any replay starts.
    with pytest.raises(CassetteError, match=r"malformed\.msgpack is corrupt"):
        ReplayIndex.from_paths([sealed("malformed.msgpack", b"\xc1abc")])
    # Well-formed but forbidden (an extension type) is found when a call takes it.
    index = ReplayIndex.from_paths([sealed("hostile.msgpack", b"\xd5\x01\x00\x00")])
    span = c.spans[0]
    call = Call("httpx", span.request, {}, {}, "GET http://x/", _key=span.key, _shape_key=span.shape)
    with pytest.raises(CassetteError, match=r"hostile\.msgpack: the recorded payload .* is corrupt"):
        index.take(call)


@pytest.mark.parametrize("version", ["1", 1.5, True, None])
def test_a_version_that_is_not_a_number_says_so_instead_of_asking_for_an_upgrade(version: object) -> None:
    raw = msgspec.json.decode(dumps(sample(), "json"))
    raw["version"] = version
    with pytest.raises(CassetteError, match="version") as info:
        loads(msgspec.json.encode(raw), "edited.json")
    assert "upgrade" not in str(info.value) and "record it again" in str(info.value)
