"""ReplayIndex: FIFO per key, the shape ladder, strict mode, miss messages, the report."""

from __future__ import annotations

import base64
import threading

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timetracer_otel.cassette import Cassette, SpanRecord
from timetracer_otel.index import ReplayIndex
from timetracer_otel.keys import Call, field_diff, http_call, stable_hash
from timetracer_otel.sql import sql_call


def recorded(call: Call, response: object, start: int) -> SpanRecord:
    return SpanRecord(
        trace_id="t" * 32, span_id=f"{start:016x}", name=call.label, start_ns=start, end_ns=start + 1,
        library=call.library, key=call.key, shape=call.shape_key, label=call.label,
        request=call.request, response=response,
    )


def index_of(*spans: SpanRecord, strict: bool = False) -> ReplayIndex:
    cassette = Cassette(id="x", name="x", created="2026-01-01", spans=list(spans))
    return ReplayIndex([("x.msgpack", cassette)], strict=strict)


def count_query(db: str = "app") -> Call:
    return sql_call("asyncpg", "SELECT count(*) FROM users", None, database=db, operation="fetchval")


def test_identical_calls_replay_in_recorded_order() -> None:
    # Recorded out of list order: start times decide, as the live run saw them.
    idx = index_of(recorded(count_query(), 1, start=20), recorded(count_query(), 0, start=10))
    first, second = idx.take(count_query()), idx.take(count_query())
    assert first is not None and second is not None
    assert (first.span.response, second.span.response) == (0, 1)
    assert first.exact and second.exact
    assert idx.take(count_query()) is None


def test_database_name_counts_and_http_query_order_and_headers_do_not() -> None:
    idx = index_of(recorded(count_query("app"), 0, 1))
    assert idx.take(count_query("other")) is None
    a = http_call("httpx", "GET", "http://127.0.0.1:1/x?b=2&a=1", [], b"")
    b = http_call("httpx", "GET", "http://127.0.0.1:1/x?a=1&b=2", [("traceparent", "00-1")], b"")
    assert a.key == b.key  # query order and headers do not count for HTTP


def test_shape_match_takes_next_unused_and_is_reported() -> None:
    live_call = http_call("httpx", "GET", "http://api/users?id=1&salt=abc", [], b"")
    idx = index_of(recorded(live_call, "one", 1))
    replay_call = http_call("httpx", "GET", "http://api/users?id=1&salt=xyz", [], b"")
    match = idx.take(replay_call)
    assert match is not None and not match.exact and match.span.response == "one"
    report = idx.report()
    assert report.exact == 0 and len(report.shape_matches) == 1
    assert any("salt" in line or "url" in line for line in report.shape_matches[0].diff)


def test_strict_mode_turns_shape_matching_off() -> None:
    idx = index_of(recorded(http_call("httpx", "GET", "http://api/u?s=1", [], b""), "x", 1), strict=True)
    assert idx.take(http_call("httpx", "GET", "http://api/u?s=2", [], b"")) is None


def test_exact_match_is_not_stolen_by_an_earlier_shape_match() -> None:
    a = sql_call("psycopg", "INSERT INTO t VALUES (%s)", (1,), database="d")
    b = sql_call("psycopg", "INSERT INTO t VALUES (%s)", (2,), database="d")
    idx = index_of(recorded(a, "A", 1), recorded(b, "B", 2))
    got_b = idx.take(b)
    got_a = idx.take(a)
    assert got_b is not None and got_a is not None
    assert (got_b.span.response, got_a.span.response) == ("B", "A")
    assert idx.take(a) is None  # each interaction is used once, whichever queue reached it


def test_miss_message_names_call_cassette_and_closest_candidates() -> None:
    rec = sql_call("asyncpg", "SELECT name FROM users WHERE id = $1", (1,), database="app")
    idx = index_of(recorded(rec, [], 1))
    live = sql_call("asyncpg", "SELECT email FROM users WHERE id = $1", (1,), database="app")
    assert idx.take(live) is None
    msg = idx.miss_message(live)
    assert "SELECT email FROM users" in msg and "x.msgpack" in msg
    assert "SELECT name FROM users" in msg and "statement: recorded" in msg
    assert idx.report().misses == [live.label]


def test_unused_interactions_are_reported() -> None:
    idx = index_of(recorded(count_query(), 0, 1), recorded(count_query("b"), 0, 2))
    idx.take(count_query())
    report = idx.report()
    assert [label for label, _ in report.unused] == [count_query("b").label]
    assert "1 recorded but unused" in report.summary()


def test_concurrent_takes_hand_out_each_interaction_once() -> None:
    spans = [recorded(count_query(), i, start=i) for i in range(2000)]
    idx = index_of(*spans)
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (m := idx.take(count_query())) is not None:
            with lock:
                got.append(m.span.response)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(2000))


@pytest.mark.parametrize(
    ("statement", "shape"),
    [
        ("SAVEPOINT __asyncpg_savepoint_17__", "SAVEPOINT __asyncpg_savepoint_N__"),
        ("RELEASE SAVEPOINT sa_savepoint_3", "RELEASE SAVEPOINT sa_savepoint_N"),
        ("SELECT 1 /* traceparent='00-a-b-01' */", "SELECT 1"),
        ("SELECT '--keep' -- drop\n", "SELECT '--keep'"),
    ],
)
def test_sql_shapes_normalise_driver_names_and_comments(statement: str, shape: str) -> None:
    call = sql_call("asyncpg", statement, None, database="d")
    assert call.shape["statement"] == shape


def test_order_follows_start_time_across_cassettes_not_file_creation() -> None:
    # The fixture's call ran first but sits in the per-process cassette, written last.
    early = Cassette(id="p", name="process", created="2026-01-01T00:00:09",
                     spans=[recorded(count_query(), "fixture", start=1)])
    late = Cassette(id="r", name="request", created="2026-01-01T00:00:05",
                    spans=[recorded(count_query(), "request", start=2)])
    idx = ReplayIndex([("request.msgpack", late), ("process.msgpack", early)])
    first, second = idx.take(count_query()), idx.take(count_query())
    assert first is not None and second is not None
    assert (first.span.response, second.span.response) == ("fixture", "request")


def test_miss_diff_compares_json_base64_bodies_with_bytes() -> None:
    from timetracer_otel.keys import field_diff

    assert field_diff({"body": ""}, {"body": b""}) == []
    assert field_diff({"body": "AAE="}, {"body": b"\x00\x01"}) == []
    assert field_diff({"body": "AAE="}, {"body": b"\x00\x02"}) == [
        "body: recorded b'\\x00\\x01', now b'\\x00\\x02'"
    ]


def test_entries_used_through_one_queue_are_skipped_in_the_other() -> None:
    # a1, b, a2 share one shape; a1 and a2 one key. A shape match takes a1 first; the exact
    # queue of A must then skip it and give a2, and the shape queue must skip everything used.
    def q(n: int) -> Call:
        return sql_call("psycopg", "SELECT * FROM t WHERE id = %s", (n,), database="d")

    idx = index_of(recorded(q(1), "a1", 1), recorded(q(2), "b", 2), recorded(q(1), "a2", 3))
    got = [idx.take(q(9)), idx.take(q(1)), idx.take(q(2)), idx.take(q(9)), idx.take(q(1))]
    assert [(m.span.response, m.exact) if m else None for m in got] == [
        ("a1", False), ("a2", True), ("b", True), None, None]


def test_a_long_run_of_one_key_replays_in_order() -> None:
    idx = index_of(*(recorded(count_query(), n, start=n) for n in range(2000)))
    taken = [m.span.response if (m := idx.take(count_query())) else None for _ in range(2001)]
    assert taken == [*range(2000), None]


@pytest.mark.parametrize("params", [None, (), [], (1,), ["x", None], ((),), {"a": 1}])
@pytest.mark.parametrize("extra", [None, {"column": 2}])
def test_sql_keys_are_the_hashes_of_the_call_trees_whichever_path_made_them(
    params: object, extra: dict[str, int] | None
) -> None:
    # Statement keys are cached per statement (and the exact key of a call without
    # parameters): a cached key must be the one the call's own trees hash to, every time.
    from timetracer_otel.keys import stable_hash

    seen = set()
    for _ in range(2):
        call = sql_call("asyncpg", "SELECT $1  /* c */", params, database="d", operation="fetch",
                        extra=extra)
        assert call.key == stable_hash("asyncpg", call.identity)
        assert call.shape_key == stable_hash("asyncpg", call.shape)
        assert call.identity["params"] == call.request["params"]
        seen.add((call.key, call.shape_key, call.label))
    assert len(seen) == 1
    other_db = sql_call("asyncpg", "SELECT $1", params, database="e", operation="fetch", extra=extra)
    assert other_db.key != call.key and other_db.shape_key != call.shape_key


def test_a_miss_diff_does_not_report_tuple_rows_against_recorded_lists() -> None:
    live = http_call("httpx", "GET", "http://api/u?s=2", [("accept", "*/*")], b"").request
    recorded = msgspec.msgpack.decode(msgspec.msgpack.encode({**live, "url": "http://api/u?s=1"}))
    assert field_diff(recorded, live) == ["url: recorded 'http://api/u?s=1', now 'http://api/u?s=2'"]


def test_header_rows_given_as_any_iterable_are_stored_as_a_list() -> None:
    call = http_call("httpx", "GET", "http://api/u", lambda: {"accept": "*/*"}.items(), b"")
    assert call.request["headers"] == [("accept", "*/*")]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(call.request))["headers"] == [["accept", "*/*"]]


@settings(max_examples=200, deadline=None)
@given(before=st.binary(max_size=8), after=st.binary(max_size=8),
       tokens=st.lists(st.text("0123456789abcdef", min_size=16, max_size=16), min_size=2,
                       max_size=2, unique=True))
def test_a_token_inside_bytes_counts_as_one_value_in_a_key_wherever_it_starts(
    before: bytes, after: bytes, tokens: list[str]
) -> None:
    """A request kept as bytes redacted in its own bytes (an app's JSON upload) holds tokens
    of its process's redaction key: the key of the replaying process must not see them. The
    JSON a key hashes carries bytes as base64, so a token is folded wherever it starts."""
    one, two = (before + b"redacted:" + t.encode() + after for t in tokens)
    assert stable_hash("botocore", {"Data": one}) == stable_hash("botocore", {"Data": two})
    assert stable_hash("botocore", {"Data": [one]}) == stable_hash("botocore", {"Data": [two]})
    assert stable_hash("botocore", {"Data": one}) != stable_hash("botocore", {"Data": one + b"!"})
    # ... and inside base64 text (an SQS body the app sends as base64 of its JSON)
    text_one, text_two = (base64.b64encode(b).decode() for b in (one, two))
    assert stable_hash("botocore", {"Body": text_one}) == stable_hash("botocore", {"Body": text_two})
    assert stable_hash("botocore", {"Body": text_one}) != stable_hash(
        "botocore", {"Body": base64.b64encode(one + b"!").decode()})
