"""Hostile and damaged cassettes are one-line CassetteErrors; writes are atomic; encryption."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import msgspec
import pytest

from timetracer_otel import cassette as cassette_mod
from timetracer_otel import crypto
from timetracer_otel.cassette import (
    Cassette,
    SpanRecord,
    add_to_file,
    dumps,
    load_cassette,
    loads,
    save_cassette,
)
from timetracer_otel.errors import CassetteError, ConfigError

KEY_HEX = "11" * 32


def sample() -> Cassette:
    span = SpanRecord(trace_id="a" * 32, span_id="b" * 16, name="GET", library="httpx", key="httpx:k",
                      label="GET http://x/", request={"body": b"\x00secret-body"}, response={"status": 200})
    return Cassette(id="c1", name="t", created="2026-11-26T00:00:00+00:00", root="b" * 16, spans=[span])


def one_line_error(data: bytes) -> str:
    with pytest.raises(CassetteError) as info:
        loads(data, "x.cassette")
    message = str(info.value)
    assert "\n" not in message and message.startswith("x.cassette")
    return message


def _str32(n: int) -> bytes:
    return b"\xdb" + n.to_bytes(4, "big")


@pytest.mark.parametrize(
    "claim",
    [_str32(0xFFFFFFFF), b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff\xc0",
     b"\xdf\xff\xff\xff\xff\xc0\xc0"],
    ids=["str32-4GiB", "bin32-4GiB", "array32-4G-items", "map32-4G-pairs"],
)
def test_huge_declared_lengths_are_rejected_without_allocating(claim: bytes) -> None:
    # Each claim sits where the cassette's id string goes; 10 GB does not fit msgpack's 32-bit
    # lengths, so the largest claim possible (4 GiB) is used, repeated to claim ~10 GB in total.
    head = b"\x83" + msgspec.msgpack.encode("name") + msgspec.msgpack.encode("n")
    head += msgspec.msgpack.encode("created") + msgspec.msgpack.encode("c") + msgspec.msgpack.encode("id")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        one_line_error(head + claim + b"x" * 64)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # msgspec checks the remaining input before allocating


def test_deep_nesting_ext_types_and_junk_are_one_line_errors() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in one_line_error(b'{"resource":{"x":' + deep + b"}}")
    assert "nested too deeply" in one_line_error(b"\x81\xa8resource\x81\xa1x" + b"\x91" * 100_000 + b"\xc0")
    ext = msgspec.msgpack.encode(
        {"id": "c", "name": "n", "created": "c", "resource": {"x": msgspec.msgpack.Ext(5, b"a")}}
    )
    assert "extension type 5" in one_line_error(ext)
    assert "neither msgpack nor JSON" in one_line_error(b"")
    assert "neither msgpack nor JSON" in one_line_error(b"\x00\x01garbage")
    assert "corrupt" in one_line_error(b'{"id": 1}')
    assert "corrupt" in one_line_error(dumps(sample())[:-3])
    huge_int = b"9" * 5000
    head = b'{"id":"c","name":"n","created":"c","spans":[{"trace_id":'
    assert "corrupt" in one_line_error(head + huge_int + b"}]}")


def test_checksum_is_required_and_covers_the_whole_cassette() -> None:
    raw = msgspec.msgpack.decode(dumps(sample()))
    del raw["checksum"]
    assert "no checksum" in one_line_error(msgspec.msgpack.encode(raw))
    raw = msgspec.msgpack.decode(dumps(sample()))
    raw["complete"] = False  # a top-level field, outside the spans
    assert "checksum" in one_line_error(msgspec.msgpack.encode(raw))
    raw = msgspec.json.decode(dumps(sample(), "json"))
    raw["root"] = "c" * 16
    assert "checksum" in one_line_error(msgspec.json.encode(raw))


def test_every_single_byte_flip_is_an_error_or_the_same_cassette() -> None:
    good = sample()
    data = dumps(good)
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        try:
            got = loads(bytes(flipped))
        except CassetteError:
            continue
        assert got == msgspec.structs.replace(good, checksum=got.checksum), f"byte {i} gave wrong data"


def test_file_size_limit_and_non_regular_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_cassette(sample(), tmp_path / "a.msgpack")
    monkeypatch.setenv("TIMETRACER_MAX_CASSETTE_BYTES", "10")
    with pytest.raises(CassetteError, match="over the 10 byte limit"):
        load_cassette(path)
    monkeypatch.delenv("TIMETRACER_MAX_CASSETTE_BYTES")
    fifo = tmp_path / "fifo.msgpack"
    os.mkfifo(fifo)
    with pytest.raises(CassetteError, match="not a regular file"):
        # opening a FIFO for reading would block; a non-blocking peer keeps the test bounded
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            load_cassette(fifo)
        finally:
            os.close(fd)


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_cassette(sample(), tmp_path / "a.msgpack")
    old = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cassette_mod.os, "fsync", broken_fsync)
    bigger = msgspec.structs.replace(sample(), name="x" * 100_000)
    with pytest.raises(CassetteError, match="No space left on device"):
        save_cassette(bigger, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.msgpack"]  # no temp file left

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cassette_mod.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_cassette(bigger, tmp_path / "b.msgpack")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.msgpack"]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_encryption_at_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", KEY_HEX)
    path = save_cassette(sample(), tmp_path / f"a.{fmt}", fmt)  # type: ignore[arg-type]
    data = path.read_bytes()
    assert data.startswith(crypto.MAGIC) and b"secret-body" not in data and b"httpx" not in data
    loaded = load_cassette(path)
    assert loaded.spans[0].label == "GET http://x/" and type(loaded) is Cassette

    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", "22" * 32)
    with pytest.raises(CassetteError, match="different key"):
        load_cassette(path)
    monkeypatch.delenv("TIMETRACER_ENCRYPTION_KEY")
    with pytest.raises(CassetteError, match="is encrypted; set TIMETRACER_ENCRYPTION_KEY"):
        load_cassette(path)
    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", KEY_HEX)
    for i in (len(crypto.MAGIC) + 9, len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(CassetteError, match="failed decryption"):
            loads(bytes(tampered), "x")
    with pytest.raises(CassetteError, match="cut short"):
        loads(data[:30], "x")


@pytest.mark.parametrize("bad", ["short", "zz" * 32, "AAAA"])
def test_a_malformed_encryption_key_is_one_line(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", bad)
    with pytest.raises(ConfigError) as info:
        dumps(sample())
    assert "\n" not in str(info.value) and "64 hex characters or base64" in str(info.value)


def test_base64_keys_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", base64.urlsafe_b64encode(b"\xfb" * 32).decode())
    assert loads(dumps(sample())).id == "c1"


def _call(n: int) -> SpanRecord:
    return SpanRecord(trace_id=f"{n:032x}", span_id=f"{n:016x}", name="GET", library="httpx",
                      key=f"httpx:{n}", label=f"GET http://x/{n}", start_ns=n, response={"status": 200})


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_adding_calls_keeps_the_files_encryption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fmt: str) -> None:
    plain = save_cassette(sample(), tmp_path / f"plain.{fmt}")
    monkeypatch.setenv("TIMETRACER_ENCRYPTION_KEY", KEY_HEX)
    sealed = save_cassette(sample(), tmp_path / f"sealed.{fmt}")
    for path in (plain, sealed):
        add_to_file(path, [_call(1)])
    assert not crypto.is_encrypted(plain.read_bytes())  # still readable without the key
    assert crypto.is_encrypted(sealed.read_bytes())
    monkeypatch.delenv("TIMETRACER_ENCRYPTION_KEY")
    assert [s.label for s in load_cassette(plain).interactions] == ["GET http://x/", "GET http://x/1"]


def _add_many(path: str, first: int) -> None:
    for n in range(first, first + 20):
        add_to_file(path, [_call(n)])


def test_processes_adding_calls_at_once_lose_none(tmp_path: Path) -> None:
    import multiprocessing

    path = save_cassette(sample(), tmp_path / "shared.msgpack")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_add_many, args=(str(path), first)) for first in (100, 200)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    keys = sorted(s.key or "" for s in load_cassette(path).interactions)
    assert keys == sorted(["httpx:k"] + [f"httpx:{n}" for n in (*range(100, 120), *range(200, 220))])
