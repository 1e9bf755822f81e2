"""Redaction rules: exact or glob names (never substrings), every configuration route, tokens."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from timetracer_otel import redaction
from timetracer_otel.errors import ConfigError
from timetracer_otel.keys import Call
from timetracer_otel.redaction import Redactor
from timetracer_otel.replay_shims.base import STATE
from timetracer_otel.sql import sql_call


def is_token(value: object) -> bool:
    return isinstance(value, str) and value.startswith("redacted:") and len(value) == 25


def test_names_match_exactly_or_by_glob_never_by_substring() -> None:
    r = Redactor(env={}, json_paths=["age", "x-*"], headers=["x-*-token"], params=["sid"])
    doc = r.json({"age": 41, "message": "hello", "page": 3, "x-ray": "y", "box": {"age": 1}})
    assert is_token(doc["age"]) and doc["message"] == "hello" and doc["page"] == 3
    assert is_token(doc["x-ray"]) and doc["box"] == {"age": 1}  # a path is anchored at the root
    assert r.header("X-Refresh-Token", "abc") != "abc"
    assert r.header("X-Token-Count", "abc") == "abc"
    expected = "http://h/p?sid=" + r.token("1") + "&sidebar=2&consider=3"
    assert r.url("http://h/p?sid=1&sidebar=2&consider=3") == expected
    # defaults: "key" and "token" are whole names; "monkey" and "tokens" are not them
    assert r.url("http://h/?monkey=1&tokens=2") == "http://h/?monkey=1&tokens=2"


def test_json_paths_any_depth_lists_and_globs() -> None:
    r = Redactor(env={}, json_paths=["**.ssn", "cards[*].number", "user.*_secret"])
    doc = r.json({"people": [{"ssn": "111-22"}, {"ssn": None, "name": "b"}],
                  "cards": [{"number": "4111", "brand": "visa"}],
                  "user": {"app_secret": "s", "name": "n"}, "password": "pw"})
    assert is_token(doc["people"][0]["ssn"]) and doc["people"][1] == {"ssn": None, "name": "b"}
    assert is_token(doc["cards"][0]["number"]) and doc["cards"][0]["brand"] == "visa"
    assert is_token(doc["user"]["app_secret"]) and doc["user"]["name"] == "n"
    assert is_token(doc["password"])  # default field names apply at any depth


def test_tokens_are_keyed_stable_with_a_shared_key_and_random_without() -> None:
    a, b = Redactor(env={"TIMETRACER_REDACTION_KEY": "k1"}), Redactor(env={"TIMETRACER_REDACTION_KEY": "k1"})
    assert a.token("secret") == b.token("secret")
    assert a.token("secret") != a.token("secret2")
    assert Redactor(env={}).token("secret") != Redactor(env={}).token("secret")
    assert a.token(a.token("secret")) == a.token("secret")  # idempotent: never a token of a token


def test_headers_keep_cookie_names_and_auth_scheme() -> None:
    r = Redactor(env={})
    assert r.header("Cookie", "a=1; sess=xyz").startswith("a=redacted:")
    assert "; sess=redacted:" in r.header("Cookie", "a=1; sess=xyz")
    set_cookie = r.header("Set-Cookie", "sid=abc; Path=/; HttpOnly")
    assert set_cookie.startswith("sid=redacted:") and set_cookie.endswith("; Path=/; HttpOnly")
    assert r.header("Authorization", "Bearer abc").startswith("Bearer redacted:")
    assert r.header("Accept", "*/*") == "*/*"


def test_environment_rules_file_and_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "redact.toml"
    rules.write_text('headers = ["x-tenant"]\njson = ["profile.dob"]\n'
                     'sql = [{statement = "insert into users*", params = [2]}]\nmongo = ["ssn"]\n')
    r = Redactor(env={"TIMETRACER_REDACT": "query:sid, json:**.pin", "TIMETRACER_REDACT_FILE": str(rules)})
    assert is_token(r.header("X-Tenant", "t1"))
    assert "sid=redacted:" in r.url("http://h/?sid=1")
    assert is_token(r.json({"a": {"pin": 1234}})["a"]["pin"])
    assert is_token(r.json({"profile": {"dob": "1990"}})["profile"]["dob"])
    assert is_token(r.document({"x": [{"ssn": "1"}]})["x"][0]["ssn"])
    params = r.sql_params("INSERT INTO users VALUES ($1, $2)", [1, "pw"])
    assert params[0] == 1 and is_token(params[1])
    assert r.sql_params("SELECT $1, $2", [1, "pw"]) == [1, "pw"]
    (tmp_path / "r.json").write_text(json.dumps({"redact": {"query": ["tenant"]}}))
    from_json = Redactor(env={"TIMETRACER_REDACT_FILE": str(tmp_path / "r.json")})
    assert "tenant=redacted:" in from_json.url("/?tenant=1")

    original = STATE.redactor
    try:
        configured = redaction.configure(sql=["$1", ":ssn"], key="project-key")
        assert STATE.redactor is configured and redaction.default_redactor() is configured
        call = sql_call("psycopg", "SELECT * FROM t WHERE a = $1", ("hunter22", 5), database="d")
        assert call.identity["params"]["$tuple"][0] == configured.token("hunter22")
        named = sql_call("psycopg", "SELECT %(ssn)s", {"ssn": "123-45", "n": 1}, database="d")
        assert is_token(named.identity["params"]["ssn"]) and named.identity["params"]["n"] == 1
    finally:
        redaction.set_default_redactor(original)


@pytest.mark.parametrize(
    "env",
    [{"TIMETRACER_REDACT": "nokind"}, {"TIMETRACER_REDACT": "cookie:x"}, {"TIMETRACER_REDACT": "json:**"},
     {"TIMETRACER_REDACT": "sql:$0"}, {"TIMETRACER_REDACT_FILE": "/nonexistent/rules.toml"}],
)
def test_bad_rules_are_one_line_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Redactor(env=env)
    assert "\n" not in str(info.value)


def test_bodies_json_form_and_gzip_are_redacted_with_content_length_fixed() -> None:
    r = Redactor(env={}, json_paths=["session.token"])
    body = json.dumps({"session": {"token": "tok-123456"}, "message": "m"}).encode()
    out = r.response({"status": 200, "headers": [["Content-Type", "application/json"],
                                                 ["Content-Length", str(len(body))]], "body": body})
    assert b"tok-123456" not in out["body"] and json.loads(out["body"])["message"] == "m"
    assert out["headers"][1] == ["Content-Length", str(len(out["body"]))]
    gz = gzip.compress(body)
    out = r.response({"headers": [["content-type", "application/json"], ["content-encoding", "gzip"]],
                      "chunks": [gz[:5], gz[5:]]})
    assert len(out["chunks"]) == 1 and b"tok-123456" not in gzip.decompress(out["chunks"][0])
    form = r.body([("Content-Type", "application/x-www-form-urlencoded")], b"user=a&password=pw1234")
    assert form.startswith(b"user=a&password=redacted:")


def test_seen_secrets_and_dsn_passwords_are_scrubbed_from_error_text() -> None:
    r = Redactor(env={})
    tok = r.header("X-API-Key", "k-very-secret-42")
    err = r.scrub({"message": "401 for key k-very-secret-42", "args": ["k-very-secret-42"]})
    assert err == {"message": f"401 for key {tok}", "args": [tok]}
    text = r.text("connect postgresql://app:pgpass99@db/x failed; dsn host=db password=pw2 user=u "
                  "url http://h/p?token=abc123&page=2")
    for secret in ("pgpass99", "password=pw2", "token=abc123"):
        assert secret not in text
    assert "page=2" in text and "user=u" in text
    assert r.dsn("host=db password='a b' user=u").startswith("host=db password=redacted:")
    assert "pgpass99" not in r.dsn("postgresql://app:pgpass99@db:5432/x")


def test_only_secret_looking_values_are_scrubbed_from_other_text() -> None:
    r = Redactor(env={})
    r.header("Cookie", "theme=darkmode; sid=s3ss10n-abcdef")
    r.url("http://h/?key=products")
    text = r.text("darkmode products s3ss10n-abcdef")
    assert text.startswith("darkmode products redacted:")


def test_span_attributes_are_redacted() -> None:
    r = Redactor(env={})
    attrs = r.attributes({"http.url": "http://u:pw-123456@h/p?api_key=k1&page=2",
                          "url.query": "token=t1&x=1", "http.request.header.authorization": ["Basic abc"],
                          "http.method": "GET", "http.status_code": 200})
    assert "pw-123456" not in attrs["http.url"] and "k1" not in attrs["http.url"]
    assert "t1" not in attrs["url.query"] and is_token(attrs["http.request.header.authorization"][0])
    assert attrs["http.method"] == "GET" and attrs["http.status_code"] == 200


def test_keys_fold_tokens_so_a_per_process_key_still_matches() -> None:
    from timetracer_otel.keys import http_call

    original = STATE.redactor
    try:
        STATE.redactor = Redactor(env={}, json_paths=["card"])
        a: Call = http_call("httpx", "POST", "http://h/p?token=1", [("content-type", "application/json")],
                            b'{"card": "4111-1111"}')
        STATE.redactor = Redactor(env={}, json_paths=["card"])  # a new process: another random key
        b = http_call("httpx", "POST", "http://h/p?token=1", [("content-type", "application/json")],
                      b'{"card": "4111-1111"}')
    finally:
        STATE.redactor = original
    assert a.request["body"] != b.request["body"] and a.key == b.key
    assert b"4111" not in a.request["body"]


_SECRET = "k-very-secret-42"
_pieces = st.sampled_from(
    ["ok", "https://u:pw123456@h/p?token=t0k3n99x", "PassWord", _SECRET, '"api_key": "z9z9z9z9z9"',
     "content-encoding", "application/json", "x=1&password=hunter2x", "\u00e9", ""]
)
_text = st.lists(_pieces, max_size=4).map(" ".join)
_headers = st.lists(
    st.tuples(st.sampled_from(["Content-Type", "Content-Length", "Location", "X-Note", "Set-Cookie"]),
              st.one_of(_text, st.sampled_from(["application/json", "application/x-www-form-urlencoded"]))
              ).map(list),
    max_size=4,
)
_bodies = st.one_of(_text.map(str.encode), st.binary(max_size=40),
                    st.builds(lambda t: json.dumps({"api_key": t, "n": 1}).encode(), _text),
                    st.builds(lambda t: json.dumps({"session": {"token": t}, "api_x": t}).encode(), _text))


_RULES = st.sampled_from(["json:**.api_key", "json:session.token,json:**.api_*", "query:sid"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=_headers, body=_bodies, split=st.one_of(st.none(), st.integers(0, 40)), reason=_text,
       rules=_RULES, body_first=st.booleans())
@example(headers=[], body=_SECRET.encode(), split=3, reason="", rules="json:**.api_key",
         body_first=False)  # a secret across two chunks
def test_packed_response_fast_path_equals_the_full_redaction(
    headers: list[list[str]], body: bytes, split: int | None, reason: str, rules: str,
    body_first: bool,
) -> None:
    # The fast path skips the walk when a scan of the packed bytes proves nothing can change:
    # it must give exactly what the full redaction gives (key order included: the packed
    # bytes are compared), for secrets anywhere in the tree and every kind of JSON rule.
    full, fast = (Redactor(env={"TIMETRACER_REDACT": rules,
                                "TIMETRACER_REDACTION_KEY": "k"}) for _ in range(2))
    for r in (full, fast):  # redacting remembers secrets: each path gets its own redactor
        r.header("X-API-Key", _SECRET)  # a seen secret, as a recorded request header makes it
    payload = {"body": body} if split is None else {"chunks": [body[:split], body[split:]]}
    tree = {"status": 200, "headers": headers, "reason": reason, **payload}
    if body_first:
        tree = {**payload, "status": 200, "headers": headers, "reason": reason}
    expected = full.response(tree)
    got, packed = fast.response_packed(tree)
    assert got == expected
    assert packed == msgspec.msgpack.encode(expected)
    assert _SECRET.encode() not in packed


_cells = st.one_of(_text, _text.map(str.encode), st.integers(-(2**63), 2**63 - 1), st.none())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(_cells, max_size=3), max_size=4))
def test_packed_fast_path_equals_the_full_redaction_for_other_results(rows: list[list[Any]]) -> None:
    # Database rows and other non-HTTP results: only URLs, passwords and seen secrets apply.
    full, fast = (Redactor(env={"TIMETRACER_REDACT": "json:**.api_key",
                                "TIMETRACER_REDACTION_KEY": "k"}) for _ in range(2))
    for r in (full, fast):
        r.header("X-API-Key", _SECRET)
    tree = {"cols": ["a", "b", "c"], "rows": rows, "tx": False}
    expected = full.response(tree)
    got, packed = fast.response_packed(tree)
    assert got == expected
    assert packed == msgspec.msgpack.encode(expected)
    assert _SECRET.encode() not in packed


_names = st.lists(st.text("abcdeiknoprstwy_-", min_size=1, max_size=14), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(names=_names)
def test_every_configured_json_name_contains_one_of_the_scan_anchors(names: list[str]) -> None:
    # The scan before a body is parsed tests the anchors only: a name that contained none of
    # them would let its field through unredacted.
    anchors = redaction._anchors(n.encode() for n in names)
    assert all(any(a in n.encode() for a in anchors) for n in names)
    assert len(anchors) <= len(set(names))


def test_a_response_naming_any_default_secret_field_takes_the_full_redaction() -> None:
    r = Redactor(env={})
    assert len(r._json_anchors) < len(r.json_anywhere.exact)  # fewer scans than names
    for name in sorted(r.json_anywhere.exact):
        body = json.dumps({name.upper(): "z9z9z9z9", "n": 1}).encode()
        tree = {"status": 200, "headers": [["Content-Type", "application/json"]], "chunks": [body]}
        _, packed = r.response_packed(tree)
        assert b"z9z9z9z9" not in packed, name


_raw_headers = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([b"Authorization", b"Cookie", b"X-API-Key"]),
                  st.sampled_from([b"Bearer " + _SECRET.encode(), b"a=" + _SECRET.encode(),
                                   _SECRET.encode()])),
        st.tuples(st.sampled_from([b"Accept", b"Date", b"traceparent", b"User-Agent"]),
                  st.sampled_from([b"*/*", b"Tue, 01 Dec", b"\xe9t\xe9", b"00-abc-01"])),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(headers=_raw_headers)
def test_header_rows_equal_the_header_by_header_redaction_and_cache_no_secret(
    headers: list[tuple[bytes, bytes]],
) -> None:
    env = {"TIMETRACER_REDACTION_KEY": "k"}  # the same tokens in both redactors
    r, plain = Redactor(env=env), Redactor(env=env)
    triples = [(k, k.lower(), v) for k, v in headers]
    skip = frozenset({b"traceparent"})
    expected = plain.headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                             if k.lower() not in skip)
    for _ in range(2):  # the second time from the cache
        assert r.header_rows(triples, skip) == expected
    assert _SECRET not in repr(r._header_rows)


def test_header_rows_of_values_that_change_on_every_call_stay_bounded() -> None:
    r = Redactor(env={})
    for i in range(10_000):
        r.header_rows([(b"Date", b"date", f"Tue, {i}".encode())])
    assert all(len(cache) <= 4096 for cache in r._header_rows.values())


def test_seen_secrets_and_url_passwords_in_httpx_response_headers_are_scrubbed() -> None:
    import httpx

    from timetracer_otel.replay_shims import httpx as shim

    secret = "sk_live_9f8e7d6c5b4a3f2e1d0c"
    STATE.redactor.token(secret)  # learned earlier, from an Authorization header say
    response = httpx.Response(200, content=b"ok", headers={
        "X-Echo-Key": secret, "Location": "https://bob:hunter2pass@example.com/x"})
    tree = shim._response_tree(response, [b"ok"])  # header rows are shared tuples
    _, packed = STATE.redactor.response_packed(tree)
    assert secret.encode() not in packed and b"hunter2pass" not in packed


def test_a_secret_learned_while_a_set_of_attributes_is_redacted_is_not_memoised_past() -> None:
    from timetracer_otel.exporters import spans

    secret = "tok_7Hq2Lx9Vb3Nc8Zr1Wd5Y"
    attrs = {"db.statement": f"SELECT * FROM t WHERE sig = '{secret}'", "server.port": 5432}
    redactor = Redactor(env={})
    original = Redactor.attributes

    def learning_meanwhile(self: Redactor, a: Any) -> dict[str, Any]:
        out = original(self, a)
        self.token(secret)  # an app thread learns it while the writer redacts
        return out

    memo: spans.Memo = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(STATE, "redactor", redactor)
        mp.setattr(Redactor, "attributes", learning_meanwhile)
        spans._redact(dict(attrs), memo)  # this span was converted before the secret was known
        mp.setattr(Redactor, "attributes", original)
        later = spans._redact(dict(attrs), memo)
    assert secret not in later["db.statement"]


def test_every_one_of_many_configured_json_names_is_scanned_for() -> None:
    names = [f"field_{i:03d}_{'x' * (i % 7)}" for i in range(200)]
    r = Redactor(env={}, json_paths=[f"**.{n}" for n in names])
    body = json.dumps({names[-1]: "z9z9z9z9"}).encode()
    _, packed = r.response_packed({"status": 200, "headers": [["Content-Type", "application/json"]],
                                   "chunks": [body]})
    assert b"z9z9z9z9" not in packed
