"""pytest plugin: one cassette per test, record modes, network blocking, tests from traffic.

The vocabulary is pytest-recording's::

    @pytest.mark.timetracer                 # tests/cassettes/<module>/<test>.json
    async def test_report(pg_pool, client):
        ...

    pytest --timetracer-record-mode=once    # default: record if missing, replay otherwise
    pytest --timetracer-record-mode=none    # replay only; a miss fails with the closest call
    pytest --timetracer-block-network       # non-loopback connects fail the test
    pytest --timetracer-replay-dir cassettes/ --timetracer-asgi-app app:app

The cassette is switched on in a setup hook that runs before any fixture, so connections
opened by fixtures are recorded (and replayed) with the test, and switched off after the
fixtures are torn down, so their cleanup calls belong to the test too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import re
import secrets
import socket
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from timetracer_otel import replay_shims
from timetracer_otel.cassette import (
    Cassette,
    SpanRecord,
    add_to_file,
    find_cassettes,
    load_cassette,
    recorder,
    save_cassette,
)
from timetracer_otel.config import Choice, Mode, OnMiss, Settings, library_names
from timetracer_otel.errors import CassetteError, ConfigError, TimetracerError
from timetracer_otel.exporters.spans import record_from_readable
from timetracer_otel.exporters.writer import rescrubbed_spans
from timetracer_otel.index import Match, ReplayIndex, ReplayReport
from timetracer_otel.keys import Call
from timetracer_otel.redaction import Redactor, set_default_redactor
from timetracer_otel.replay_shims.base import STATE, carries_call, learn_statements, statements
from timetracer_otel.runtime import Replaying, hold_mode, release, sdk_provider


class RecordMode(Choice):
    """pytest-recording's record modes, applied to one cassette per test."""

    ONCE = "once"  # record when the cassette is missing, replay otherwise
    NEW_EPISODES = "new_episodes"  # replay; calls with no recording (and, after a new write,
    # the same backend's calls) go live and are appended
    NONE = "none"  # replay only; a missing cassette or a miss fails the test
    ALL = "all"  # always record; the cassette is overwritten when the test passes
    REWRITE = "rewrite"  # delete the cassette first, then record


class NetworkBlockedError(TimetracerError):
    """A socket connect that ``--timetracer-block-network`` does not allow."""


_MAX_NAME = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")


def cassette_filename(test_id: str, suffix: str = ".json", *, before_2026_11_28: bool = False) -> str:
    """A file name for a test id: readable, and unique even when characters were replaced.

    >>> cassette_filename("TestApi::test_get[a/b]")
    'TestApi.test_get[a_b]-2ce4c46784.json'
    """
    # "::" becomes "." only before the parameters: a parametrize id may hold both "::" and ".",
    # and "[a::b]" must not share "[a.b]"'s file (its ":" makes it take the hash instead).
    head, bracket, params = test_id.partition("[")
    text = head.replace("::", ".") + bracket + params
    if before_2026_11_28:  # the earlier rule, for cassettes already recorded under it
        text = test_id.replace("::", ".")
    safe = _UNSAFE.sub("_", text)
    if safe != text or len(safe) > _MAX_NAME:
        digest = hashlib.blake2b(test_id.encode(), digest_size=5).hexdigest()
        safe = f"{safe[:80]}-{digest}"
    return safe + suffix


# --- span collection: the dependency spans that end while a test is active ---------------


class _SpanCollector(SpanProcessor):
    """Added once to the SDK provider (processors cannot be removed); it keeps the dependency
    spans that end while a test records, in whatever thread or task they ran."""

    def __init__(self) -> None:
        self.target: list[ReadableSpan] | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        target = self.target
        # Only a list append here (atomic under the GIL); conversion waits for the test's end.
        if target is not None and carries_call(span):
            target.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- network blocking --------------------------------------------------------------------


@dataclass
class _NetworkPolicy:
    """Which connects the current test may make; ``blocked`` lists the refused ones."""

    loopback: bool = True
    allowed: frozenset[str] = frozenset()
    blocked: list[str] = field(default_factory=list)

    def allows(self, address: Any) -> bool:
        if isinstance(address, str | bytes):  # AF_UNIX path: a local service
            return self.loopback
        if not isinstance(address, tuple) or not address:
            return True
        host = str(address[0])
        if host in self.allowed:
            return True
        if host == "localhost":
            return self.loopback
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False  # a host name: only reachable by resolving it, i.e. the network
        return self.loopback and ip.is_loopback


class _NetworkGuard:
    """Wraps ``socket.socket.connect``/``connect_ex`` for the whole session (asyncio connects
    through them too). C libraries that open their own sockets (libpq) are not seen."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(allowed)
        self.policy = _NetworkPolicy(loopback=True, allowed=self.allowed)
        self._saved: tuple[Any, Any] | None = None

    def install(self) -> None:
        cls = socket.socket
        self._saved = (cls.connect, cls.connect_ex)
        connect, connect_ex = self._saved
        guard = self

        def guarded_connect(sock: socket.socket, address: Any) -> None:
            __tracebackhide__ = True
            guard.check(address)
            connect(sock, address)

        def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
            __tracebackhide__ = True
            guard.check(address)
            return int(connect_ex(sock, address))

        cls.connect = guarded_connect  # type: ignore[method-assign,assignment]
        cls.connect_ex = guarded_connect_ex  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if self._saved is not None:
            socket.socket.connect, socket.socket.connect_ex = self._saved  # type: ignore[method-assign]
            self._saved = None

    def check(self, address: Any) -> None:
        __tracebackhide__ = True
        policy = self.policy
        if policy.allows(address):
            return
        where = repr(address) if isinstance(address, str | bytes) else ":".join(map(str, address[:2]))
        policy.blocked.append(str(where))
        what = "a replaying test" if not policy.loopback else "--timetracer-block-network"
        raise NetworkBlockedError(
            f"Connect to {where} blocked by {what}; record the call, or allow the host with "
            "--timetracer-allowed-hosts."
        )

    def start_test(self, loopback: bool) -> _NetworkPolicy:
        self.policy = _NetworkPolicy(loopback=loopback, allowed=self.allowed)
        return self.policy

    def end_test(self) -> None:
        # Between tests (collection, session fixtures): only non-loopback connects are refused.
        self.policy = _NetworkPolicy(loopback=True, allowed=self.allowed)


# --- each test's secrets --------------------------------------------------------------------


class _TestSecrets:
    """Each test starts from the project's redactor as configured, without the secrets other
    tests taught it: a secret learned at run time (a bearer token in one test's request) is
    scrubbed from the calls that test makes later, and therefore from their keys, so one
    learned in an earlier test would make a later test's cassette, and the keys its replay
    computes, depend on which tests ran before it (alone, in the suite, on an xdist worker).

    The test gets a fork of the project's redactor (same rules, same key: equal secrets, equal
    tokens; no learned secrets), and the project's own comes back after the test, having
    learned what the test's fork learned; one the test's code configured meanwhile stays.
    What a cassette stores is scrubbed once more, keys aside, with every secret known so far
    (:meth:`scrubbed`): one test's secret never reaches another's cassette in plain text."""

    def __init__(self) -> None:
        self._own: Redactor | None = None  # the project's redactor, as it was set
        self._lent: Redactor | None = None  # the running test's fork

    def start(self) -> None:
        current = STATE.redactor
        if type(current) is not Redactor:  # (unreadable rules: entry points stop before this)
            return
        if current is not self._lent:  # the project's (configure() may have set a new one)
            self._own = current
        assert self._own is not None
        self._lent = self._own.fork()
        set_default_redactor(self._lent)

    def scrubbed(self, spans: list[SpanRecord]) -> list[SpanRecord]:
        """``spans``' payloads and labels without any secret known in this process: the
        running test's and those the project's redactor learned (other tests', fixtures')."""
        if self._lent is None or self._own is None:
            return rescrubbed_spans(spans)
        everything = self._lent.fork(learned=True)
        everything.learn(self._own.learned_since(0)[1])
        return rescrubbed_spans(spans, everything)

    def end(self) -> None:
        lent, self._lent = self._lent, None
        if lent is None or self._own is None:
            return
        self._own.learn(lent.learned_since(0)[1])
        if STATE.redactor is lent:
            set_default_redactor(self._own)


# --- new_episodes: after a new write, the same backend's calls go live -----------------------

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_SQL_LIBRARIES = frozenset({"asyncpg", "psycopg"})
_SQL_READS = frozenset({"SELECT", "SHOW"})


def _backend(call: Call) -> tuple[str, ...]:
    """Where the state a call reads or changes lives, as far as its key tells: an HTTP origin
    (whichever client), a SQL database (whichever driver), a library's database or service
    (a Redis db, a MongoDB database, an AWS service), else the library."""
    ident = call.identity
    if isinstance(ident, dict):
        if "method" in ident and "host" in ident:
            return ("http", str(ident.get("scheme")), str(ident["host"]))
        if call.library in _SQL_LIBRARIES:
            return ("sql", str(ident.get("db")))
        for name in ("db", "service"):
            if name in ident:
                return (call.library, name, str(ident[name]))
    return (call.library,)


def _may_write(call: Call) -> bool:
    """False for the calls known to change nothing (an HTTP GET/HEAD/OPTIONS, a SQL SELECT or
    SHOW, a connect); any other call may have changed its backend's state."""
    ident = call.identity
    if isinstance(ident, dict):
        if "method" in ident and "host" in ident:
            return str(ident["method"]).upper() not in _SAFE_METHODS
        if call.library in _SQL_LIBRARIES:
            if ident.get("op") == "connect":
                return False
            words = str(ident.get("statement") or "").split(None, 1)
            return not words or words[0].upper() not in _SQL_READS
    return True


class _EpisodeIndex(ReplayIndex):
    """new_episodes' index: once a call that may write went live as a new episode (a POST
    with another body), the later calls of the test to the same backend go live too, and are
    recorded, instead of being answered from before that write (the list a GET returned when
    the cassette's POST was another). Other backends, and calls after a new read, replay."""

    def __init__(self, sources: list[tuple[str, Cassette]], *, strict: bool) -> None:
        super().__init__(sources, strict=strict)
        self.stale: dict[tuple[str, ...], str] = {}  # backend: the new write that changed it
        self.sent_live: list[str] = []  # the calls sent live for that, with the write
        self._sending: dict[int, Call] = {}  # taken (not answered), before decide() reports it

    def take(self, call: Call) -> Match | None:
        backend = _backend(call)
        write = self.stale.get(backend)
        if write is not None:
            self._sending[id(call)] = call  # (kept: its id is not reused meanwhile)
            self.sent_live.append(f"{call.label} (after {write})")
            return None
        match = super().take(call)
        if match is None and _may_write(call):
            self.stale.setdefault(backend, call.label)
        return match

    def miss_message(self, call: Call, *, hint: str = "") -> str:
        if self._sending.pop(id(call), None) is not None:  # sent live on purpose: not a miss
            return f"{call.label} goes live: a new episode changed what it reads."
        return super().miss_message(call, hint=hint)


# --- one test's cassette -----------------------------------------------------------------

_MARKER_OPTIONS = frozenset({"path", "on_miss", "live", "strict", "allow_unused"})


@dataclass(frozen=True)
class CassetteOptions:
    """What the markers (function, class, module; the closest wins) and the config say."""

    path: Path
    record_mode: RecordMode
    on_miss: OnMiss = OnMiss.ERROR
    live: frozenset[str] = frozenset()
    strict: bool = False
    allow_unused: bool = False
    # This test's cassette under the name an earlier release gave it, when only that one
    # exists: replayed (and added to) there; a full recording goes to ``path`` and removes it.
    earlier: Path | None = None


class ActiveCassette:
    """The running test's cassette, as the ``timetracer`` fixture returns it.

    >>> @pytest.mark.timetracer
    ... def test_items(timetracer):
    ...     httpx.get(f"{UPSTREAM}/items")
    ...     assert [c.label for c in timetracer.calls] == [f"GET {UPSTREAM}/items"]
    ...     assert timetracer.unused == []           # replay: every recorded call was made
    """

    def __init__(self, options: CassetteOptions, test_id: str,
                 scrubbed: Callable[[list[SpanRecord]], list[SpanRecord]] = rescrubbed_spans,
                 ) -> None:
        self.options = options
        self.test_id = test_id
        self.scrubbed = scrubbed  # what is written, scrubbed once more (see _TestSecrets)
        self.path = options.path
        self.record_mode = options.record_mode
        self.recording = False  # True: calls go live and are written; False: replayed
        self.cassette: Cassette | None = None
        self._recorded: list[ReadableSpan] = []
        self._replaying: Replaying | None = None
        self._mode_run: Any = None  # the recording's run (runtime.hold_mode)
        self.written = False

    @property
    def action(self) -> str:
        if self.recording:
            return "recording"
        if self.record_mode is RecordMode.NEW_EPISODES:
            return "replaying, recording calls it lacks"
        return "replaying"

    @property
    def calls(self) -> list[SpanRecord]:
        """The dependency calls so far: recorded live, or the recorded ones replayed."""
        if self.recording:  # libraries kept live are not part of the cassette
            live = self.options.live
            records = _converted(self._recorded)[0]
            return sorted((s for s in records if s.library not in live), key=lambda s: s.start_ns)
        unused = {id(s) for s in self.unused}
        recorded = self.cassette.interactions if self.cassette is not None else []
        appended = self._replaying.appended if self._replaying is not None else []
        return [s for s in recorded if id(s) not in unused] + list(appended)

    @property
    def unused(self) -> list[SpanRecord]:
        """Recorded interactions no call has used (yet); always empty while recording."""
        if self._replaying is None:
            return []
        return [e.record() for e in self._replaying.index.unused()]

    @property
    def sent_live(self) -> list[str]:
        """new_episodes: the calls sent live because a new episode before them wrote to the
        same backend (each with that write)."""
        index = self._replaying.index if self._replaying is not None else None
        return list(index.sent_live) if isinstance(index, _EpisodeIndex) else []

    @property
    def report(self) -> ReplayReport | None:
        """The replay report (exact, by shape, missed, unused), or None while recording."""
        return self._replaying.report if self._replaying is not None else None

    # -- lifecycle (driven by the plugin's setup and teardown hooks) -----------------------

    def start(self) -> None:
        mode, earlier = self.record_mode, self.options.earlier
        if earlier is not None and mode not in (RecordMode.ALL, RecordMode.REWRITE):
            self.path = earlier
        exists = self.path.is_file()
        if mode is RecordMode.REWRITE:
            for old in (self.path, earlier):
                if old is not None and old.is_file():
                    old.unlink()
            exists = False
        if mode is RecordMode.NONE and not exists:
            raise CassetteError(
                f"No cassette at {self.path} for {self.test_id} and the record mode is 'none'; "
                "record it with --timetracer-record-mode=once."
            )
        if mode in (RecordMode.ALL, RecordMode.REWRITE) or not exists:
            self.recording = True
            self._mode_run = hold_mode(Mode.RECORD)
            return
        self.cassette = load_cassette(self.path)
        # `none` replays only, whatever the marker says; new_episodes records what it lacks.
        on_miss = {RecordMode.NONE: OnMiss.ERROR, RecordMode.NEW_EPISODES: OnMiss.RECORD}.get(
            mode, self.options.on_miss)
        # Indexed under the file's name, which miss messages then show. new_episodes matches
        # strictly: a call only like a recorded one (another query value, another parameter)
        # is a new episode, recorded, not answered with the other one's response.
        strict = self.options.strict or mode is RecordMode.NEW_EPISODES
        sources = [(str(self.path), self.cassette)]
        index = (_EpisodeIndex(sources, strict=strict) if mode is RecordMode.NEW_EPISODES
                 else ReplayIndex(sources, strict=strict))
        rep = Replaying(index, on_miss=on_miss, live=self.options.live)
        rep.__enter__()
        self._replaying = rep

    def collect(self, collector: _SpanCollector) -> None:
        if self.recording:
            collector.target = self._recorded

    def stop(self, collector: _SpanCollector, passed: bool) -> list[str]:
        """Switch the cassette off; write or check it. Returns the problems that fail the test."""
        if self.recording:
            collector.target = None
            if self._mode_run is not None:
                release(self._mode_run)
                self._mode_run = None
            records, errors = _converted(self._recorded)
            if errors:
                return [f"{len(errors)} recorded call(s) could not be converted for {self.path} "
                        f"(the cassette was not written): {errors[0]}"]
            return self._write(records) if passed else []
        rep = self._replaying
        if rep is None:
            return []
        rep.__exit__()
        problems: list[str] = []
        report = rep.report
        if not passed:
            return problems
        if report.misses and rep.on_miss is OnMiss.ERROR:
            # The test passed, so the code swallowed the ReplayMissError: still a failure.
            problems.append(f"{len(report.misses)} call(s) had no recording in {self.path}:")
            problems.extend(f"  - {label}" for label in report.misses)
        elif report.stranded:  # (on_miss let them go live, but there was no server)
            problems.append(f"{len(report.stranded)} call(s) had no recording in {self.path} and "
                            "could not go live (a connection opened from the cassette):")
            problems.extend(f"  - {label}" for label in report.stranded)
        if report.unsupported:  # refused in replay (ReplayUnsupportedError), even if caught
            problems.append(f"{len(report.unsupported)} call(s) recorded in {self.path} were "
                            "refused in replay (not supported there; see the README):")
            problems.extend(f"  - {what}" for what in report.unsupported)
        if rep.appended:  # new_episodes, or on_miss="record": the calls it lacked join it
            # new_episodes: the recorded calls this run left unused that share a shape with a
            # new one (the same call with another parameter) are what it replaced: removed.
            shapes = {s.shape for s in rep.appended}
            drop = ({e.span.span_id for e in rep.index.unused() if e.span.shape in shapes}
                    if self.record_mode is RecordMode.NEW_EPISODES else set())
            try:
                add_to_file(self.path, self.scrubbed(list(rep.appended)),
                            known=rep.index.key_counts(), drop=drop)
                self.written = True
            except CassetteError as exc:
                problems.append(f"The calls {self.test_id} recorded were not added to {self.path}: "
                                f"{exc}")
        if report.unused and self.record_mode is RecordMode.NONE and not self.options.allow_unused:
            problems.append(
                f"{len(report.unused)} recorded call(s) in {self.path} were not made "
                "(allow with @pytest.mark.timetracer(allow_unused=True) or the ini option "
                "timetracer_allow_unused, or record again with --timetracer-record-mode=rewrite):"
            )
            problems.extend(f"  - {label}" for label, _ in report.unused)
        return problems

    def _write(self, spans: list[SpanRecord]) -> list[str]:
        """Write the cassette; a write that fails is the test's one-line failure."""
        live = self.options.live
        kept = sorted((s for s in spans if s.library not in live), key=lambda s: s.start_ns)
        cassette = Cassette(
            id=secrets.token_hex(8),
            name=self.test_id,
            created=dt.datetime.now(dt.timezone.utc).isoformat(),
            recorder=recorder("pytest"),
            spans=self.scrubbed(kept),
        )
        try:
            save_cassette(cassette, self.path)
        except CassetteError as exc:
            return [f"The cassette of {self.test_id} was not written: {exc}"]
        self.written = True
        earlier = self.options.earlier
        if earlier is not None and earlier != self.path:  # recorded again: under the current name
            with contextlib.suppress(FileNotFoundError):
                earlier.unlink()
        return []


def _test_id(item: pytest.Item) -> str:
    """The test's id within its module (its node id without the file's path)."""
    return _within_module(item.nodeid) if "::" in item.nodeid else item.name


def _within_module(node_id: str) -> str:
    """A node id without the module's path, which depends on the rootdir."""
    return node_id.split("::", 1)[1] if "::" in node_id else node_id


def _converted(spans: list[ReadableSpan]) -> tuple[list[SpanRecord], list[str]]:
    records, errors = [], []
    for span in list(spans):
        try:
            records.append(record_from_readable(span))
        except Exception as exc:  # a call missing from the cassette must not pass silently
            errors.append(f"{span.name}: {type(exc).__name__}: {exc}")
    return [r for r in records if r.library], errors


# --- the plugin ----------------------------------------------------------------------------

_ACTIVE = pytest.StashKey[ActiveCassette]()
_FAILED = pytest.StashKey[bool]()
_POLICY = pytest.StashKey[_NetworkPolicy]()
_SECRETS = pytest.StashKey[bool]()  # the test runs with its own copy of the redactor


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("timetracer", "timetracer-otel record/replay")
    group.addoption(
        "--timetracer-record-mode",
        default=None,
        help="once (default: record when the cassette is missing, replay otherwise), "
        "new_episodes, none, all or rewrite.",
    )
    group.addoption(
        "--timetracer-block-network",
        action="store_true",
        default=None,
        help="fail a test that connects to a non-loopback address (a replaying test: to any).",
    )
    group.addoption(
        "--timetracer-allowed-hosts",
        default=None,
        help="comma-separated hosts (IP addresses) that --timetracer-block-network lets through.",
    )
    group.addoption(
        "--timetracer-replay-dir",
        default=None,
        metavar="DIR",
        help="collect every recorded cassette in DIR as a test of the app (see --timetracer-asgi-app).",
    )
    group.addoption(
        "--timetracer-asgi-app",
        default=None,
        metavar="MODULE:APP",
        help="the ASGI app that --timetracer-replay-dir replays recorded requests against.",
    )
    parser.addini("timetracer_cassette_dir", "directory for per-test cassettes (default: "
                  "'cassettes' next to each test module)", default="")
    parser.addini("timetracer_record_mode", "default record mode", default="once")
    parser.addini("timetracer_allow_unused", "do not fail 'none' mode tests that leave recorded "
                  "calls unused", type="bool", default=False)
    parser.addini("timetracer_block_network", "as --timetracer-block-network", type="bool",
                  default=False)
    parser.addini("timetracer_allowed_hosts", "hosts --timetracer-block-network lets through",
                  type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "timetracer(path=None, on_miss='error', live=(), strict=False, allow_unused=False): "
        "record this test's dependency calls into one cassette, and replay them from it.",
    )
    try:
        plugin = TimetracerPlugin(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(plugin, "timetracer-otel-session")


class TimetracerPlugin:
    """Session state: the options, the span collector and the network guard."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        mode = config.getoption("timetracer_record_mode") or config.getini("timetracer_record_mode")
        self.record_mode = RecordMode.parse(str(mode), "--timetracer-record-mode")
        self.cassette_dir = str(config.getini("timetracer_cassette_dir") or "")
        self.allow_unused = bool(config.getini("timetracer_allow_unused"))
        self.settings = Settings.from_env()
        hosts = config.getoption("timetracer_allowed_hosts")
        allowed = hosts.split(",") if hosts else list(config.getini("timetracer_allowed_hosts"))
        block = config.getoption("timetracer_block_network") or config.getini("timetracer_block_network")
        self.guard = _NetworkGuard(h.strip() for h in allowed if h.strip()) if block else None
        self.replay_dir = config.getoption("timetracer_replay_dir")
        self.asgi_app_spec = config.getoption("timetracer_asgi_app")
        if self.replay_dir and not self.asgi_app_spec:
            raise ConfigError("--timetracer-replay-dir needs --timetracer-asgi-app MODULE:APP.")
        self.collector: _SpanCollector | None = None
        self.secrets = _TestSecrets()
        self._app: Any = None
        self.startups: list[tuple[str, Cassette]] = []  # (see CassetteFile.collect)
        self.lone: list[tuple[str, Cassette]] = []  # (see CassetteFile.collect)
        self.statements: dict[str, Any] = {}  # (see base.STATEMENTS)
        if self.guard is not None:
            self.guard.install()

    def pytest_unconfigure(self) -> None:
        if self.guard is not None:
            self.guard.uninstall()

    def pytest_report_header(self) -> str:
        block = ", network blocked" if self.guard is not None else ""
        return f"timetracer-otel: record mode {self.record_mode.value}{block}"

    def _tracing(self) -> _SpanCollector:
        # Lazily, at the first cassette test: the app's conftest may set its own provider first.
        if self.collector is None:
            self.collector = _SpanCollector()
            sdk_provider("pytest").add_span_processor(self.collector)
            replay_shims.instrument()
            STATE.put(max_payload_bytes=self.settings.max_payload_bytes)
        return self.collector

    def startup(self) -> tuple[str, Cassette] | None:
        """The app's latest recorded lifespan startup in ``--timetracer-replay-dir`` (the
        startup cassettes collection met, see CassetteFile.collect)."""
        from timetracer_otel.inbound import startup_cassette

        return startup_cassette(self.startups)

    def asgi_app(self) -> Any:
        if self._app is None:
            from timetracer_otel.inbound import instrument_app, load_app

            try:
                self._app = instrument_app(load_app(str(self.asgi_app_spec)))
            except ConfigError as exc:
                message = str(exc).replace("--asgi", "--timetracer-asgi-app")
            else:
                return self._app
            pytest.fail(message, pytrace=False)  # (outside the except: said once, not chained)
        return self._app

    @pytest.hookimpl(tryfirst=True)  # before -k / -m deselect, so they apply to these items
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if not self.replay_dir:
            return
        try:
            files = find_cassettes(self.replay_dir)
        except CassetteError as exc:
            raise pytest.UsageError(f"--timetracer-replay-dir: {exc}") from None
        for path in files:
            collector = CassetteFile.from_parent(session, path=path.resolve())
            items.extend(i for i in collector.collect() if isinstance(i, pytest.Item))

    # -- per-test cassettes ---------------------------------------------------------------

    def options_for(self, item: pytest.Item) -> CassetteOptions | None:
        marks = list(item.iter_markers("timetracer"))
        if not marks and "timetracer" not in getattr(item, "fixturenames", ()):
            return None
        kwargs: dict[str, Any] = {}
        for mark in reversed(marks):  # module, then class, then function: the closest wins
            if mark.args:
                kwargs["path"] = mark.args[0]
            kwargs.update(mark.kwargs)
        unknown = set(kwargs) - _MARKER_OPTIONS
        if unknown:
            raise ConfigError(
                f"@pytest.mark.timetracer got unknown option(s) {', '.join(sorted(unknown))}; "
                f"use: {', '.join(sorted(_MARKER_OPTIONS))}."
            )
        live = kwargs.get("live", ())
        if isinstance(live, str):
            live = [live]
        path = self.cassette_path(item, kwargs.get("path"))
        earlier = None if kwargs.get("path") else self.earlier_cassette(item, path)
        if path.suffix.lower() not in (".json", ".msgpack"):  # found now, not after the test
            raise ConfigError(f"@pytest.mark.timetracer(path={kwargs.get('path')!r}): a cassette "
                              "file ends in .json or .msgpack; rename it.")
        return CassetteOptions(
            path=path,
            record_mode=self.record_mode,
            on_miss=OnMiss.parse(str(kwargs.get("on_miss", self.settings.on_miss.value)), "on_miss"),
            live=library_names(",".join(map(str, live)), "@pytest.mark.timetracer(live=...)")
            | self.settings.live,
            strict=bool(kwargs.get("strict", self.settings.strict)),
            allow_unused=bool(kwargs.get("allow_unused", self.allow_unused)),
            earlier=earlier,
        )

    def cassette_path(self, item: pytest.Item, explicit: Any = None) -> Path:
        """``<module dir>/cassettes/<module>/<test>.json`` unless the ini or marker says else."""
        module_dir = item.path.parent
        if explicit:
            p = Path(explicit)
            return p if p.is_absolute() else module_dir / p
        test_id = _test_id(item)
        if not self.cassette_dir:
            directory = module_dir / "cassettes" / item.path.stem
        else:
            try:
                module = item.path.with_suffix("").relative_to(self.config.rootpath)
            except ValueError:
                module = Path(item.path.stem)
            directory = self.config.rootpath / self.cassette_dir / module
        return directory / cassette_filename(test_id)

    @staticmethod
    def earlier_cassette(item: pytest.Item, path: Path) -> Path | None:
        """This test's cassette under the name it had before "::" in a parameter id changed
        the rule, when only that file exists and it names this test (another test may own
        that name now). Compared without the module's path, which depends on the rootdir."""
        test_id = _test_id(item)
        earlier = path.with_name(cassette_filename(test_id, path.suffix,
                                                   before_2026_11_28=True))
        if earlier == path or path.exists() or not earlier.is_file():
            return None
        with contextlib.suppress(TimetracerError):
            if _within_module(load_cassette(earlier).name) == test_id:
                return earlier
        return None

    # The innermost wrapper: still before every fixture (the runner sets them up inside all
    # wrappers), and a failure here leaves the other plugins' wrappers consistent.
    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        # Before every fixture: connections opened by fixtures belong to the test's cassette.
        policy_loopback = True
        if isinstance(item, ReplayItem):
            self._own_secrets(item)
        else:
            problem, active = None, None
            try:
                options = self.options_for(item)
                if options is not None:
                    self._tracing()  # provider and shims first, then the mode switch
                    self._own_secrets(item)
                    active = ActiveCassette(options, item.nodeid, self.secrets.scrubbed)
                    active.start()
            except (ConfigError, CassetteError) as exc:
                problem = str(exc)
            if problem is not None:  # raised outside the except: no chained traceback
                pytest.fail(problem, pytrace=False)
            if active is not None:
                item.stash[_ACTIVE] = active
                active.collect(self._tracing())
                # A replaying test needs no socket at all, loopback included, unless a library
                # stays live (hybrid) and may talk to a local server.
                policy_loopback = active.recording or bool(active.options.live)
                item.add_report_section(
                    "setup", "timetracer",
                    f"cassette {active.path} ({active.action}, record mode "
                    f"{active.record_mode.value}); to record it again: pytest "
                    f"--timetracer-record-mode=rewrite '{item.nodeid}'",
                )
        if self.guard is not None:
            item.stash[_POLICY] = self.guard.start_test(policy_loopback)
        return (yield)

    def _own_secrets(self, item: pytest.Item) -> None:
        self.secrets.start()
        item.stash[_SECRETS] = True

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed or report.skipped:  # a partial run neither writes nor judges a cassette
            item.stash[_FAILED] = True
        return report

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        try:
            result = yield  # fixtures are torn down in here; their calls belong to the test
        finally:
            problems = self._end_test(item)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        return result

    def _end_test(self, item: pytest.Item) -> list[str]:
        passed = not item.stash.get(_FAILED, False)
        problems: list[str] = []
        active = item.stash.get(_ACTIVE, None)
        try:
            if active is not None:
                problems += active.stop(self._tracing(), passed)  # (redacted with its secrets)
                if active.report is not None:  # shown with a failure: shape matches, misses...
                    item.add_report_section("teardown", "timetracer", active.report.render()
                                            + "".join(f"\n  live after a new write: {c}"
                                                      for c in active.sent_live))
        finally:
            if item.stash.get(_SECRETS, False):
                self.secrets.end()
        policy = item.stash.get(_POLICY, None)
        if self.guard is not None and policy is not None:
            self.guard.end_test()
            if policy.blocked and passed:  # the code swallowed the NetworkBlockedError
                problems.append("connects blocked by --timetracer-block-network: "
                                + ", ".join(policy.blocked))
        return problems


@pytest.fixture
def timetracer(request: pytest.FixtureRequest) -> ActiveCassette:
    """The running test's :class:`ActiveCassette` (requesting it turns the cassette on, like
    the marker)."""
    active: ActiveCassette | None = request.node.stash.get(_ACTIVE, None)
    if active is None:
        pytest.fail("the timetracer fixture works in test functions only.", pytrace=False)
    return active


# --- tests from recorded traffic -----------------------------------------------------------


class InboundMismatch(TimetracerError):
    """The app answered a recorded request differently (the result holds the diff)."""

    def __init__(self, result: Any) -> None:
        super().__init__(result.render())
        self.result = result


class CassetteFile(pytest.File):
    """One recorded cassette of ``--timetracer-replay-dir``: one item, its inbound request."""

    def collect(self) -> Iterable[pytest.Item]:
        from timetracer_otel.inbound import inbound_span, is_startup

        try:
            cassette = load_cassette(self.path)
        except CassetteError as exc:
            yield ReplayItem.from_parent(self, name=self.path.name, cassette=None, problem=str(exc))
            return
        # What its prepares answered, for a statement an item prepares again on a fresh
        # connection where its own request found it prepared (see base.STATEMENTS).
        plugin = self.config.pluginmanager.get_plugin("timetracer-otel-session")
        if isinstance(plugin, TimetracerPlugin):
            learn_statements(cassette.interactions, plugin.statements)
        span = inbound_span(cassette)
        if span is None and is_startup(cassette):  # each item runs it (ReplayItem)
            if isinstance(plugin, TimetracerPlugin):
                plugin.startups.append((str(self.path), cassette))
            return
        if span is None and cassette.root is None and isinstance(plugin, TimetracerPlugin):
            plugin.lone.append((str(self.path), cassette))  # (they answer a startup too)
        if span is None:
            problem = "skip: no recorded inbound request (a task or plain-process cassette)"
            yield ReplayItem.from_parent(self, name=self.path.name, cassette=None, problem=problem)
            return
        name = f"{span.label or span.name} [trace {span.trace_id[:8]}]"
        yield ReplayItem.from_parent(self, name=name, cassette=cassette, problem=None)


class ReplayItem(pytest.Item):
    """Replays a recorded inbound request against ``--timetracer-asgi-app``, with every
    dependency answered from the same cassette; fails with the response or call diff."""

    def __init__(self, *, cassette: Cassette | None, problem: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cassette = cassette
        self.problem = problem

    def runtest(self) -> None:
        from timetracer_otel.inbound import _recorded_request, _replay_in_lifespan, _run_sync

        if self.problem is not None:
            if self.problem.startswith("skip: "):
                pytest.skip(self.problem.removeprefix("skip: "))
            pytest.fail(self.problem, pytrace=False)
        assert self.cassette is not None
        plugin = self.config.pluginmanager.get_plugin("timetracer-otel-session")
        assert isinstance(plugin, TimetracerPlugin)
        settings = plugin.settings
        # Inside the app's lifespan, as `replay --asgi` runs it: the directory's recorded
        # startup, run for each item (each test starts the app afresh).
        loaded, _, span = _recorded_request(self.cassette)
        with statements(plugin.statements):  # (this directory's, for these items only)
            result = _run_sync(_replay_in_lifespan(
                loaded, str(self.path), span, plugin.asgi_app(), plugin.startup(), auto=True,
                on_miss=settings.on_miss.value, strict=settings.strict, lone=plugin.lone))
        if not result.ok:
            raise InboundMismatch(result)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None
    ) -> str | Any:
        exc = excinfo.value
        if isinstance(exc, InboundMismatch):
            r = exc.result
            lines = [f"{r.label}: the app's answer differs from the recording in {self.path}"]
            lines += [f"    {d}" for d in r.diff]
            lines += [f"    note: {n}" for n in r.notes]
            lines.append(r.report.summary())
            return "\n".join(lines)
        if isinstance(exc, TimetracerError):
            return f"{self.path}: {exc}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name
