"""Fuzz the cassette decoder (msgpack, JSON, encrypted): any input is a Cassette or one
CassetteError line, never another exception. Bounded example counts keep it to seconds in CI."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timetracer_otel.cassette import Cassette, SpanRecord, dumps, loads
from timetracer_otel.errors import CassetteError

# TIMETRACER_FUZZ_EXAMPLES raises the bound for a long local run; CI keeps the default.
EXAMPLES = int(os.environ.get("TIMETRACER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=EXAMPLES <= 300)

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)
trees = st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=20)


def _valid(request: Any = None, response: Any = None) -> Cassette:
    span = SpanRecord(trace_id="a" * 32, span_id="b" * 16, name="GET", library="httpx", key="httpx:k",
                      label="GET /", request=request, response=response, attributes={"a": 1})
    return Cassette(id="c", name="n", created="2026-11-26", root="b" * 16, spans=[span])


SEEDS = [dumps(_valid({"body": b"\x00\x01"}, {"status": 200})), dumps(_valid({"q": [1, "x"]}), "json")]


def check(data: bytes) -> None:
    try:
        got = loads(data, "fuzz")
    except CassetteError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz")
        return
    assert type(got) is Cassette
    assert loads(dumps(got)) == msgspec.structs.replace(got, checksum=loads(dumps(got)).checksum)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_mutated_valid_cassettes(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for at, value in flips:
        data[at % len(data)] = value
    check(bytes(data[: max(1, len(data) - cut % 64)]))


@FUZZ
@given(st.dictionaries(st.sampled_from(["id", "name", "created", "version", "spans", "checksum", "root",
                                        "complete", "resource", "recorder"]), trees, max_size=10),
       st.booleans())
def test_structured_hostile_documents(doc: dict[str, Any], as_json: bool) -> None:
    check(msgspec.json.encode(doc) if as_json else msgspec.msgpack.encode(doc))


@FUZZ
@given(trees, trees, st.booleans())
def test_any_payload_tree_round_trips_in_both_formats(request: Any, response: Any, as_json: bool) -> None:
    c = _valid(request, response)
    got = loads(dumps(c, "json" if as_json else "msgpack"))
    assert got.spans[0].label == "GET /" and got.checksum is not None
    # JSON keeps the tree in its own image (bytes as base64 text, tuples as lists).
    expected = msgspec.json.decode(msgspec.json.encode([request, response])) if as_json \
        else [request, response]
    assert [got.spans[0].request, got.spans[0].response] == expected


@pytest.mark.parametrize("data", [
    # Regression inputs found while hardening: each once escaped as a non-CassetteError.
    b'{"resource":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}",  # RecursionError
    b"\x81\xa8resource\x81\xa1x\xd4\x05\x00",  # msgpack Ext object in an Any field
    b'{"id":"c","name":"n","created":"c"}',  # no checksum: once loaded unverified
])
def test_regressions(data: bytes) -> None:
    with pytest.raises(CassetteError):
        loads(data, "fuzz")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_regression_non_finite_payload_keeps_a_valid_json_checksum(value: float) -> None:
    # Found by the fuzzer: JSON wrote inf as null, read back as the omitted default, and the
    # cassette failed its own checksum.
    got = loads(dumps(_valid({"x": 1}, value), "json"))
    assert got.spans[0].response is None and got.spans[0].request == {"x": 1}


@FUZZ
@given(st.binary(max_size=256))
def test_encrypted_envelope_fuzz(tail: bytes) -> None:
    from timetracer_otel import crypto

    os.environ["TIMETRACER_ENCRYPTION_KEY"] = "33" * 32
    try:
        check(crypto.MAGIC + tail)
    finally:
        del os.environ["TIMETRACER_ENCRYPTION_KEY"]
