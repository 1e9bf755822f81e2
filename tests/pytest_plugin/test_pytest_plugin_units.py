"""The plugin's pure parts: file names, record modes, the network policy, usage errors."""

from __future__ import annotations

import pytest

from timetracer_otel.errors import ConfigError
from timetracer_otel.pytest_plugin import RecordMode, _NetworkPolicy, cassette_filename

pytest_plugins = ["pytester"]


def test_cassette_filename_is_readable_unique_and_bounded() -> None:
    assert cassette_filename("test_get") == "test_get.json"
    assert cassette_filename("TestApi::test_get[1-2]") == "TestApi.test_get[1-2].json"
    # Replaced characters get a hash suffix, so "a/b" and "a_b" never share a file.
    slash, underscore = cassette_filename("test[a/b]"), cassette_filename("test[a_b]")
    assert slash.startswith("test[a_b]-") and underscore == "test[a_b].json"
    # A parameter id may hold "::" and "." both: "[a::b]" and "[a.b]" are different tests.
    colons, dot = cassette_filename("test[a::b]"), cassette_filename("test[a.b]")
    assert dot == "test[a.b].json" and colons.startswith("test[a__b]-") and colons != dot
    assert cassette_filename("C::test[x::y]") != cassette_filename("C::test[x.y]")
    assert cassette_filename("C::test[::1]", before_2026_11_28=True) == "C.test[.1].json"
    long_a, long_b = cassette_filename("t" * 300 + "a"), cassette_filename("t" * 300 + "b")
    assert long_a != long_b and len(long_a) <= 100
    assert cassette_filename("t" * 300 + "a") == long_a  # deterministic
    assert type(long_a) is str


def test_record_mode_parse_lists_valid_values() -> None:
    assert RecordMode.parse(" New_Episodes ", "mode") is RecordMode.NEW_EPISODES
    with pytest.raises(ConfigError, match="use one of: once, new_episodes, none, all, rewrite"):
        RecordMode.parse("sometimes", "--timetracer-record-mode")


def test_network_policy() -> None:
    recording = _NetworkPolicy(loopback=True)
    assert recording.allows(("127.0.0.1", 5432)) and recording.allows(("::1", 80, 0, 0))
    assert recording.allows(("localhost", 80)) and recording.allows("/run/postgresql/.s.PGSQL.5432")
    assert not recording.allows(("10.0.0.5", 80)) and not recording.allows(("example.com", 443))
    replaying = _NetworkPolicy(loopback=False, allowed=frozenset({"127.0.0.1"}))
    assert replaying.allows(("127.0.0.1", 8000))  # explicitly allowed
    assert not replaying.allows(("127.0.0.2", 8000)) and not replaying.allows("/tmp/sock")


def test_usage_errors_are_one_line(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_a="import pytest\n@pytest.mark.timetracer(pth='x')\ndef test_a(): pass\n")
    bad_mode = pytester.runpytest_inprocess("--timetracer-record-mode=sometimes", "-p", "no:cacheprovider")
    assert bad_mode.ret == pytest.ExitCode.USAGE_ERROR
    bad_mode.stderr.fnmatch_lines(["*--timetracer-record-mode='sometimes' is not valid; "
                                   "use one of: once, new_episodes, none, all, rewrite."])
    no_app = pytester.runpytest_inprocess("--timetracer-replay-dir", ".", "-p", "no:cacheprovider")
    no_app.stderr.fnmatch_lines(["*--timetracer-replay-dir needs --timetracer-asgi-app MODULE:APP."])
    bad_marker = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    bad_marker.assert_outcomes(errors=1)
    bad_marker.stdout.fnmatch_lines(["@pytest.mark.timetracer got unknown option(s) pth; use: "
                                     "allow_unused, live, on_miss, path, strict.*"])
