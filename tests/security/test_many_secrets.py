"""A redactor that learns thousands of secrets (a bearer token per request) still scrubs every
one it keeps, in str, UTF-8 bytes, binary bytes and packed trees, longest match first, whether
a secret was compiled into the scrub pattern or learned after its last compile."""

from __future__ import annotations

import pickle
import random
import re

import msgspec
import pytest

from timetracer_otel import redaction
from timetracer_otel.redaction import Redactor

KEEP = redaction._SEEN_LIMIT


def reference(r: Redactor, text: str) -> str:
    """What one longest-first alternation of the secrets ``r`` keeps makes of ``text``."""
    seen = dict(r._seen)
    if not seen:
        return text
    pattern = re.compile("|".join(map(re.escape, sorted(seen, key=len, reverse=True))))
    return pattern.sub(lambda m: seen[m[0]], text)


def reference_binary(r: Redactor, data: bytes) -> bytes:
    seen = [s.encode() for s in r._seen]
    pattern = re.compile(b"|".join(map(re.escape, sorted(seen, key=len, reverse=True))))
    return pattern.sub(lambda m: (b"redacted:" + b"*" * len(m[0]))[:len(m[0])], data)


def family(i: int) -> list[str]:
    """Three secrets each a prefix of the next, and one that ends the longest."""
    base = f"tok{i:05d}k"
    return [base, base + "Q7x", base + "Q7xZ9w", "Z9w" + f"{i:05d}sfx"]


def test_every_secret_of_2000_requests_is_scrubbed_as_it_is_learned() -> None:
    r = Redactor(env={}, key=b"k" * 32)
    for i in range(2000):
        secret = f"bearer{i:05d}" + "abcdefgh"[i % 8] * 12
        row = r.headers([("Authorization", f"Bearer {secret}"), ("Accept", "*/*")])[0]
        token = row[1].removeprefix("Bearer ")
        assert token.startswith("redacted:")
        echoed = f'upstream said: invalid token "{secret}" ({i})'
        assert r.text(echoed) == echoed.replace(secret, token)
        assert r.scrub_bytes(echoed.encode()) == echoed.replace(secret, token).encode()
        binary = b"\xff\x00" + secret.encode() + b"\xfe"
        assert r.scrub_bytes(binary) == b"\xff\x00" + (b"redacted:" + b"*" * 99)[:len(secret)] + b"\xfe"
        tree = {"cmd": ["SET", f"session:{secret}", b"x" + secret.encode()]}
        assert r.seen_in(msgspec.msgpack.encode(tree))
        assert r.scrub(tree) == {"cmd": ["SET", f"session:{token}", b"x" + token.encode()]}
        response = {"headers": [["content-type", "text/plain"]], "body": secret.encode()}
        assert r.response_packed(response)[0]["body"] == token.encode()
        assert not r.seen_in(b"nothing secret here")


def test_2000_secrets_prefixes_of_one_another_all_scrubbed_at_once() -> None:
    r = Redactor(env={}, key=b"k" * 32)
    secrets = [s for i in range(500) for s in family(i)]
    assert len(secrets) == 2000
    tokens = {s: r.token(s) for s in secrets}
    kept = secrets[-KEEP:]
    assert list(r._seen) == kept  # the newest are kept; the oldest are forgotten
    payload = " | ".join(secrets)
    expected = reference(r, payload)
    for scrubbed in (r.text(payload), r.scrub_bytes(payload.encode()).decode()):
        assert scrubbed == expected
        for s in kept:
            assert s not in scrubbed and tokens[s] in scrubbed
    # Each kept secret alone; where several start at one place, the longest wins (c over its
    # prefixes a and b, and over d, which starts inside it).
    for i in range(500 - KEEP // 4, 500):
        a, b, c, d = family(i)
        assert (r.text(a), r.text(b), r.text(c), r.text(d)) == (tokens[a], tokens[b], tokens[c], tokens[d])
        assert r.text(c + f"{i:05d}sfx") == tokens[c] + f"{i:05d}sfx"
        assert r.scrub_bytes(b"\xff" + a.encode() + b"Q7") == b"\xffredacted:Q7"  # len(a) == 9
    data = b"\x80" + payload.encode()
    assert r.scrub_bytes(data) == reference_binary(r, data)
    pattern = r.seen_pattern()
    assert pattern is not None and {m.decode() for m in pattern.findall(payload.encode())} <= set(kept)


def test_a_secret_learned_after_the_last_compile_is_scrubbed_everywhere() -> None:
    r = Redactor(env={}, key=b"k" * 32)
    for i in range(300):
        r.token(f"old-secret-{i:04d}")
    assert r.seen_pattern() is not None  # compiled: every secret so far is in the one pattern
    new = "fresh-secret-0001"
    token = r.token(new)
    text = f"token {new} leaked"
    assert r.text(text) == f"token {token} leaked"
    assert r.scrub_bytes(text.encode()) == f"token {token} leaked".encode()
    assert r.scrub_bytes(b"\xff" + new.encode()) == b"\xff" + b"redacted:********"
    assert r.seen_in(text.encode())
    assert r.scrub({"k": [text]}) == {"k": [f"token {token} leaked"]}
    assert r.response_packed({"headers": [], "body": new.encode()})[0]["body"] == token.encode()
    pattern = r.seen_pattern()
    assert pattern is not None and pattern.search(new.encode())


@pytest.mark.parametrize("compiled_first", ["short", "long"])
def test_longest_match_across_compiled_and_recent_secrets(compiled_first: str) -> None:
    r = Redactor(env={}, key=b"k" * 32)
    short, long = "prefix-secret", "prefix-secret-and-more"
    first, second = (short, long) if compiled_first == "short" else (long, short)
    r.token(first)
    assert r.seen_pattern() is not None  # ``first`` compiled, ``second`` only recent below
    r.token(second)
    text = f"{long} / {short}"
    assert r.text(text) == f"{r.token(long)} / {r.token(short)}"
    assert r.text(text) == reference(r, text)
    data = b"\xff" + text.encode()
    assert r.scrub_bytes(data) == reference_binary(r, data)


def test_a_forgotten_compiled_secret_does_not_hide_a_kept_one() -> None:
    r = Redactor(env={}, key=b"k" * 32)
    long = "kept-secret-plus-forgotten-tail"
    r.token(long)
    for i in range(KEEP - 1):
        r.token(f"filler-secret-{i:04d}")
    assert r.seen_pattern() is not None  # all KEEP compiled, ``long`` the oldest
    short = "kept-secret"
    r.token(short)  # evicts ``long``, which the compiled pattern still holds
    assert long not in r._seen and short in r._seen
    text = f"<{long}>"
    assert r.text(text) == f"<{r.token(short)}-plus-forgotten-tail>" == reference(r, text)


def test_random_overlapping_secrets_match_one_alternation() -> None:
    """Many secrets over a two-letter alphabet (every one overlaps others), learned and
    forgotten while payloads are scrubbed: the same result as one longest-first alternation
    of the kept secrets, for str and for binary bytes, compiled or not."""
    rnd = random.Random(1234)
    r = Redactor(env={}, key=b"k" * 32)
    for step in range(1500):
        r.token("".join(rnd.choice("ab") for _ in range(rnd.randint(8, 14))))
        if step % 13 == 0:
            text = "".join(rnd.choice("abc") for _ in range(120))
            assert r.text(text) == reference(r, text)
            data = b"\xff" + text.encode()
            assert r.scrub_bytes(data) == reference_binary(r, data)
        if step % 97 == 0:
            r.seen_pattern()  # a compile here and there, the rest found as recent


def test_a_pickled_redactor_scrubs_every_secret_it_knew() -> None:
    r = Redactor(env={}, key=b"k" * 32)
    secrets = [f"pickled-secret-{i:04d}" for i in range(700)]
    for i, s in enumerate(secrets):
        r.token(s)
        if i == 400:
            r.seen_pattern()
    copy = pickle.loads(pickle.dumps(r))
    payload = " ".join(secrets)
    assert copy.text(payload) == r.text(payload) == reference(r, payload)
    assert copy.seen_in(secrets[-1].encode()) and not copy.seen_in(b"nothing")
