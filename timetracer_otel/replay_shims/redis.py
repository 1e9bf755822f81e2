"""redis-py: commands and pipelines, sync and asyncio.

The OTel instrumentation wraps ``Redis.execute_command`` and ``Pipeline.execute`` (and their
asyncio twins); this shim sits beneath those wrappers, so their spans are current.

Record keeps the raw replies the connection read (``read_response``, before redis-py's
response callbacks), in order, each a value or the error the server sent. Replay runs
redis-py's own parsing again over a stand-in connection that answers those reads, so the
callbacks rebuild the same Python values (bytes or str as the client decodes, ints, floats,
dicts, sets, tuples of scores...), ``EMPTY_RESPONSE`` and ``raise_on_error`` behave as
live, and a pipeline's ``ResponseError`` is raised, or returned in place, as it was. A call
that failed before the server answered (``ConnectionError``, ``TimeoutError``) is recorded
as that error and raised again.

The key is the command as it goes on the wire (every argument through the client's own
encoder, a first argument like ``"CONFIG SET"`` split into its words as redis-py sends it, so
``set("k", 1)`` and ``set(b"k", b"1")`` are one call), the database number, the RESP
protocol and whether the client decodes replies (the recorded replies have that form); the
server's address is not part of it. Secrets in ``AUTH``, ``HELLO ... AUTH``,
``MIGRATE ... AUTH/AUTH2``, ``CONFIG SET requirepass|masterauth`` and ``ACL SETUSER``
passwords become redaction tokens before they are stored or hashed, and the values of
``requirepass``/``masterauth`` in a ``CONFIG GET`` reply are scrubbed.

Not replayed: a pipeline that WATCHes keys or runs scripts (its commands go straight to the
server through ``immediate_execute_command``), Pub/Sub and cluster clients raise
:class:`ReplayUnsupportedError` in replay (record leaves them unrecorded); client-side
caching is not covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import Any

import redis
import redis.asyncio

from timetracer_otel.codec import Tree, from_tree, register, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.errors import ReplayMissError, ReplayUnsupportedError
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    LIVE,
    RECORD,
    STATE,
    Deferrable,
    Shim,
    answer_cancelled,
    decide,
    error_tree,
    instantiate,
    rebuild_error,
    suppressed,
    was_cancelled,
)

LIBRARY = "redis"
SCOPE = "opentelemetry.instrumentation.redis"

# The errors of a call that never got the server's answer: recorded as the call's error.
# Any other (a ResponseError, a WatchError) comes from the reads, which replay runs again.
_UNANSWERED = (redis.ConnectionError, redis.TimeoutError, OSError)


def _replaying() -> bool:
    return STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY)


# --- the request -----------------------------------------------------------------------------


def _arg(value: Any, encode: Any) -> str | bytes:
    """One argument as sent (the client's encoder), as text where it is UTF-8."""
    data = encode(value)
    if type(data) is not bytes:
        data = bytes(data)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def _redacted(args: list[str | bytes]) -> list[str | bytes]:
    """``args`` with the passwords Redis commands carry replaced by redaction tokens."""
    if not args:
        return args
    name = args[0].upper() if isinstance(args[0], str) else b""
    secret: set[int] = set()
    if name == "AUTH":  # AUTH [username] password
        secret.add(len(args) - 1)
    elif name in ("HELLO", "MIGRATE"):  # ... AUTH password | AUTH username password (HELLO)
        for i, a in enumerate(args):
            word = a.upper() if isinstance(a, str) else ""
            if word == "AUTH":
                secret.add(i + 2 if name == "HELLO" else i + 1)
            elif word == "AUTH2":  # MIGRATE ... AUTH2 username password
                secret.add(i + 2)
    elif name == "CONFIG" and len(args) > 3 and isinstance(args[1], str) \
            and args[1].upper() == "SET":
        for i in range(2, len(args) - 1, 2):
            if isinstance(args[i], str) and args[i].lower() in ("requirepass", "masterauth"):
                secret.add(i + 1)
    elif name == "ACL" and len(args) > 2:  # ACL SETUSER name >password #hash ...
        secret.update(i for i, a in enumerate(args[3:], 3)
                      if isinstance(a, str) and a[:1] in (">", "#", "<", "!"))
    if not secret:
        return args
    r = STATE.redactor
    return [r.token(a) if i in secret and i < len(args) else a for i, a in enumerate(args)]


def _command(client: Any, args: Sequence[Any]) -> list[str | bytes] | None:
    """The command as the wire carries it, redacted; None when the client's encoder refuses
    an argument (a live call then raises the client's own DataError once connected; a replay
    raises it at once)."""
    encode = client.get_encoder().encode
    try:
        words = [_arg(a, encode) for a in args]
    except (redis.DataError, TypeError, ValueError):
        if _replaying():
            raise
        return None
    first = words[0] if words else None
    if isinstance(first, str) and " " in first:  # "CONFIG SET": redis-py sends its words apart
        words[:1] = first.split()
    return _redacted(words)


def _client(client: Any) -> dict[str, Any]:
    """What decides a recorded reply's form: database, RESP protocol, decoded or bytes."""
    kwargs = client.connection_pool.connection_kwargs
    protocol = kwargs.get("protocol") or 2
    return {"db": kwargs.get("db", 0), "resp": int(protocol) if str(protocol).isdigit() else 2,
            "decoded": bool(kwargs.get("decode_responses", False))}


def _label(words: Sequence[str | bytes]) -> str:
    text = " ".join(w if isinstance(w, str) else repr(w) for w in words)
    return text if len(text) <= 120 else text[:117] + "..."


def _command_call(client: Any, command: list[str | bytes]) -> Call:
    on = _client(client)
    # A secret the app's redactor has seen (a header, a password) stored as a value becomes
    # its token before the command is stored or keyed, as it does in the replies.
    command = STATE.redactor.scrub(command)
    request = {**on, "command": command}
    shape = {**on, "command": command[0], "argc": len(command)}
    return Call(LIBRARY, request, request, shape, _label(command[:2]))


def _pipeline_call(client: Any, commands: list[list[str | bytes]], transaction: bool) -> Call:
    on = _client(client)
    commands = STATE.redactor.scrub(commands)
    request = {**on, "transaction": transaction, "commands": commands}
    shape = {**on, "transaction": transaction, "commands": [[c[0], len(c)] for c in commands]}
    label = _label(["MULTI" if transaction else "PIPELINE", *(c[0] for c in commands)])
    return Call(LIBRARY, request, request, shape, label)


# --- the replies -----------------------------------------------------------------------------


# --- errors ----------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, bytes, tuple, list, type(None))


def _error_attrs(exc: BaseException) -> Tree:
    """What redis-py set on an exception besides its args: ``status_code`` (``"NOSCRIPT"``,
    ``"ERR"``, ``"EXECABORT"``...), and the plain attributes of the errors that parse their
    message (``AskError.slot_id``, ``node_addr``...); None when there is none."""
    attrs: dict[str, Any] = {}
    for name, value in vars(exc).items():
        if name.startswith("_") or not isinstance(value, _PLAIN):
            continue  # (error_type, an enum, is set by the class itself)
        tree = to_tree(value)
        if isinstance(tree, dict) and "$unsupported" in tree:
            continue
        attrs[name] = tree
    return attrs or None


def _error_tree(exc: BaseException) -> Tree:
    return error_tree(exc, _error_attrs(exc))


def _build_error(cls: type[BaseException], tree: Tree) -> BaseException:
    """The recorded error as redis-py builds it: ``cls(*args, status_code=code)``, then its
    other recorded attributes; a cassette recorded before they were kept gives ``cls(*args)``."""
    args = from_tree(tree["args"]) if tree.get("args") is not None else (tree["message"],)
    attrs = tree.get("attrs")
    attrs = attrs if isinstance(attrs, dict) else {}
    exc: BaseException | None = None
    if "status_code" in attrs:
        try:
            exc = cls(*args, status_code=from_tree(attrs["status_code"]))  # type: ignore[call-arg]
        except Exception:
            exc = None
    if exc is None:
        exc = instantiate(cls, *args)
    for name, value in attrs.items():
        if not isinstance(name, str) or name.startswith("_") or name == "args":
            continue
        value = from_tree(value)
        if getattr(exc, name, _MISSING) != value:
            with contextlib.suppress(Exception):  # (a read-only attribute: the class sets it itself)
                setattr(exc, name, value)
    return exc


_MISSING = object()


class _ReplyError:
    """An error inside a reply (an ``EXEC`` reply holds one per failed command)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


register(_ReplyError, "redis.error", lambda e: _error_tree(e.error),
         lambda tree: rebuild_error(tree, _build_error))


def _with_errors_marked(value: Any) -> Any:
    if isinstance(value, BaseException):
        return _ReplyError(value)
    if type(value) is list and any(type(v) is list or isinstance(v, BaseException) for v in value):
        return [_with_errors_marked(v) for v in value]
    return value


def _read_tree(value: Any = None, error: BaseException | None = None) -> Tree:
    if error is not None:
        return {"error": _error_tree(error)}
    return {"value": to_tree(_with_errors_marked(value))}


# The call being recorded in this task or thread (see parse_response).
_RECORDING: ContextVar[_Recording | None] = ContextVar("timetracer_redis_recording", default=None)


class _Tap:
    """A live connection whose reads are kept by the recording."""

    def __init__(self, conn: Any, recording: _Recording) -> None:
        self._conn, self._recording = conn, recording

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = self._conn.read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            self._recording.read(error=exc)
            raise
        self._recording.read(value)
        return value


class _AsyncTap(_Tap):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = await self._conn.read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            self._recording.read(error=exc)
            raise
        self._recording.read(value)
        return value


class _Replayed:
    """A connection that never connects: it answers the recorded reads in order."""

    himport_registry = None  # (redis-py 8: no per-connection HIMPORT state to prepare)

    def __init__(self, reads: Sequence[Tree]) -> None:
        self._reads = reads
        self._next = 0

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._next >= len(self._reads):  # (not a ResponseError: a pipeline would keep it)
            raise ReplayMissError("redis read more replies for this call than the recording "
                                  "holds; record it again.", library=LIBRARY)
        read = self._reads[self._next]
        self._next += 1
        if read.get("error") is not None:
            raise rebuild_error(read["error"], _build_error)
        return from_tree(read["value"])

    def pack_commands(self, commands: Any) -> Any:
        return commands

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        pass

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        pass

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        pass


class _AsyncReplayed(_Replayed):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        return _Replayed.read_response(self, *args, **kwargs)

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        pass

    async def send_command(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        pass

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        pass


_SECRET_SETTINGS = frozenset({"requirepass", "masterauth", b"requirepass", b"masterauth"})


def _learn_config_secrets(command: list[str | bytes], value: Any) -> None:
    """A ``CONFIG GET`` reply's passwords, taught to the redactor so the stored reply is
    scrubbed of them (a flat list in RESP2, a map in RESP3)."""
    if len(command) < 2 or not isinstance(command[0], str) or command[0].upper() != "CONFIG" \
            or not isinstance(command[1], str) or command[1].upper() != "GET":
        return
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        pairs = list(zip(value[::2], value[1::2], strict=False))
    r = STATE.redactor
    for name, secret in pairs:
        if name in _SECRET_SETTINGS and isinstance(secret, str | bytes) and secret:
            r.token(secret)


def _recorded_reads(match: Match) -> list[Tree]:
    span = match.span
    if span.error is not None:
        raise rebuild_error(span.error, _build_error)
    reads: list[Tree] = span.response["reads"]
    return reads


# --- the patched methods ---------------------------------------------------------------------


def _parse_response(original: Any) -> Any:
    def parse_response(self: Any, connection: Any, command_name: Any, **options: Any) -> Any:
        recording = _RECORDING.get()
        if recording is not None and not isinstance(connection, _Tap | _Replayed):
            connection = _Tap(connection, recording)
        return original(self, connection, command_name, **options)

    return parse_response


def _async_parse_response(original: Any) -> Any:
    async def parse_response(self: Any, connection: Any, command_name: Any, **options: Any) -> Any:
        recording = _RECORDING.get()
        if recording is not None and not isinstance(connection, _Tap | _Replayed):
            connection = _AsyncTap(connection, recording)
        return await original(self, connection, command_name, **options)

    return parse_response


def _execute_command(original: Any) -> Any:
    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        plan = _command_plan(self, args)
        if plan is None or plan[0] is LIVE:
            return original(self, *args, **options)
        action, command = plan
        if isinstance(action, Match):
            return self.parse_response(_Replayed(_recorded_reads(action)), args[0], **options)
        with _Recording(action, command):
            return original(self, *args, **options)

    return execute_command


def _async_execute_command(original: Any) -> Any:
    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        plan = _command_plan(self, args)
        if plan is None or plan[0] is LIVE:
            return await original(self, *args, **options)
        action, command = plan
        if isinstance(action, Match):
            if was_cancelled(action.span):
                return await answer_cancelled(action.span)
            return await self.parse_response(_AsyncReplayed(_recorded_reads(action)), args[0],
                                             **options)
        with _Recording(action, command):
            return await original(self, *args, **options)

    return execute_command


def _command_plan(client: Any, args: Sequence[Any]) -> tuple[Any, list[str | bytes]] | None:
    """What to do with a command: None (call it as it is: off, or not encodable), else the
    decision (a Match, LIVE, or the Call to record) and the command."""
    if STATE.mode is Mode.OFF or not args:
        return None
    command = _command(client, args)
    if command is None:
        return None
    call = _command_call(client, command)
    action = decide(call)
    return (call if action is RECORD else action), command


def _reads_response(reads: list[Tree]) -> Tree:
    return {"reads": reads}


# Commands and pipelines, recorded as the reads they made: left to the writer, which keys,
# scrubs and packs them, where the instrumentation's span can take them (base.Deferrable).
_deferrable = Deferrable(LIBRARY, SCOPE, _reads_response)


class _Recording:
    """``with _Recording(call):`` around a live call: the reads it makes are kept and put on
    its span (or left beside it for the writer) as it ends (see :func:`_finish`); a single
    command keeps the reads of its last attempt (a retried command reads once per attempt)."""

    def __init__(self, call: Call, command: list[str | bytes] | None = None) -> None:
        self.cap = _deferrable(call)
        self.command = command
        self.reads: list[Tree] = []
        self.token: Token[_Recording | None] | None = None

    def read(self, value: Any = None, error: BaseException | None = None) -> None:
        """Keep one read: the value, or the error the server sent."""
        if error is None and self.command is not None:
            _learn_config_secrets(self.command, value)
        self.reads.append(_read_tree(value, error))

    def __enter__(self) -> None:
        self.cap.__enter__()
        self.token = _RECORDING.set(self)

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self.token is not None:
            _RECORDING.reset(self.token)
        reads = self.reads[-1:] if self.command is not None else self.reads
        try:
            if exc is None:
                self.cap.ok(reads)
            elif isinstance(exc, Exception):
                _finish(self.cap, exc, reads)
            elif isinstance(exc, asyncio.CancelledError):  # (kept: the order stays the live one)
                self.cap.fail(exc)
        finally:
            self.cap.__exit__(kind, exc, tb)


def _finish(cap: Any, exc: BaseException, reads: list[Tree]) -> None:
    """A call that raised: the server's answer when it gave one (replay raises it again
    through redis-py's own parsing), else the error itself."""
    if reads and not isinstance(exc, _UNANSWERED):
        cap.ok(reads)
    else:
        cap.fail(exc, _error_attrs(exc))


def _pipeline_commands(pipe: Any) -> list[list[str | bytes]] | None:
    commands = []
    for args, _options in pipe.command_stack:
        command = _command(pipe, args)
        if command is None:
            return None
        commands.append(command)
    return commands


def _is_transaction(pipe: Any) -> bool:
    # The asyncio pipeline's flag is is_transaction: its `transaction` is the client's method.
    flag = pipe.is_transaction if hasattr(pipe, "is_transaction") else pipe.transaction
    return flag is True or bool(pipe.explicit_transaction)


def _unsupported(what: str) -> ReplayUnsupportedError:
    return ReplayUnsupportedError(
        f"{what} is not replayed; record and replay it with redis kept live "
        "(TIMETRACER_LIVE_PLUGINS=redis, or replay(live=['redis']))."
    )


def _refused(what: str, is_async: bool) -> Any:
    """A replacement that refuses ``what`` in replay and calls the original otherwise."""
    def make(original: Any) -> Any:
        if is_async:
            async def refuse_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                if _replaying() and not suppressed():
                    raise _unsupported(what)
                return await original(self, *args, **kwargs)

            return refuse_async

        def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _replaying() and not suppressed():  # (not the app's: plumbing run untraced)
                raise _unsupported(what)
            return original(self, *args, **kwargs)

        return refuse

    return make


def _fresh_attempt(original: Any) -> Any:
    """A pipeline's send-and-read, which redis-py retries on a connection error: each attempt
    starts its recorded reads afresh (the failed attempt's are not the answer)."""
    def attempt(self: Any, *args: Any, **kwargs: Any) -> Any:
        recording = _RECORDING.get()
        if recording is not None:
            recording.reads.clear()
        return original(self, *args, **kwargs)

    return attempt


def _pipeline_plan(pipe: Any) -> tuple[Any, bool] | None:
    """What to do with a pipeline's execute: None (as it is: off, empty, WATCHing, scripts, or
    not encodable), else the decision (see :func:`_command_plan`) and whether it is MULTI."""
    if STATE.mode is Mode.OFF or not pipe.command_stack or pipe.watching or pipe.scripts:
        return None
    commands = _pipeline_commands(pipe)
    if commands is None:
        return None
    transaction = _is_transaction(pipe)
    call = _pipeline_call(pipe, commands, transaction)
    action = decide(call)
    return (call if action is RECORD else action), transaction


def _pipeline_execute(original: Any) -> Any:
    def execute(self: Any, raise_on_error: bool = True) -> Any:
        plan = _pipeline_plan(self)
        if plan is None or plan[0] is LIVE:
            return original(self, raise_on_error)
        action, transaction = plan
        if isinstance(action, Match):
            run = self._execute_transaction if transaction else self._execute_pipeline
            try:
                return run(_Replayed(_recorded_reads(action)), self.command_stack, raise_on_error)
            finally:
                self.reset()
        with _Recording(action):
            return original(self, raise_on_error)

    return execute


def _async_pipeline_execute(original: Any) -> Any:
    async def execute(self: Any, raise_on_error: bool = True) -> Any:
        plan = _pipeline_plan(self)
        if plan is None or plan[0] is LIVE:
            return await original(self, raise_on_error)
        action, transaction = plan
        if isinstance(action, Match):
            run = self._execute_transaction if transaction else self._execute_pipeline
            try:
                if was_cancelled(action.span):
                    return await answer_cancelled(action.span)
                return await run(_AsyncReplayed(_recorded_reads(action)), self.command_stack,
                                 raise_on_error)
            finally:
                await self.reset()
        with _Recording(action):
            return await original(self, raise_on_error)

    return execute


# Set while a client is made in a replay: a single-connection client (``single_connection_client
# =True``, ``Redis.client()``) takes its connection from the pool then, which connects it.
_NOT_YET: ContextVar[bool] = ContextVar("timetracer_redis_not_yet", default=False)


def _made_unconnected(original: Any, is_async: bool) -> Any:
    """``Redis.__init__`` (or asyncio's ``initialize``): in a replay, the connection a
    single-connection client takes is left unconnected (its commands are answered from the
    cassette; one that goes live, a miss let through, connects it then)."""
    if is_async:
        async def initialize(self: Any, *args: Any, **kwargs: Any) -> Any:
            token = _NOT_YET.set(True) if _replaying() else None
            try:
                return await original(self, *args, **kwargs)
            finally:
                if token is not None:
                    _NOT_YET.reset(token)

        return initialize

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        token = _NOT_YET.set(True) if _replaying() else None
        try:
            original(self, *args, **kwargs)
        finally:
            if token is not None:
                _NOT_YET.reset(token)

    return __init__


def _later(original: Any, *, is_async: bool, answer: Any = None) -> Any:
    """A connection's ``connect`` (``answer`` None) or ``can_read`` (False) while a client is
    made in a replay (see :data:`_NOT_YET`): nothing is connected, nothing can be read."""
    if is_async:
        async def later(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _NOT_YET.get():
                return answer
            return await original(self, *args, **kwargs)

        return later

    def later_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _NOT_YET.get():
            return answer
        return original(self, *args, **kwargs)

    return later_sync


class RedisShim(Shim):
    library = LIBRARY
    requires = "redis"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.redis:RedisInstrumentor"

    def patch(self) -> None:
        import redis.asyncio.client
        import redis.asyncio.connection
        import redis.client
        import redis.connection

        self.wrap(redis.Redis, "__init__", lambda o: _made_unconnected(o, False))
        self.wrap(redis.asyncio.Redis, "initialize", lambda o: _made_unconnected(o, True))
        for module, is_async in ((redis.connection, False), (redis.asyncio.connection, True)):
            self.wrap(module.AbstractConnection, "connect", functools.partial(
                _later, is_async=is_async))
            self.wrap(module.AbstractConnection, "can_read", functools.partial(
                _later, is_async=is_async, answer=False))
        self.wrap(redis.Redis, "execute_command", _execute_command)
        self.wrap(redis.Redis, "parse_response", _parse_response)
        self.wrap(redis.client.Pipeline, "execute", _pipeline_execute)
        watched = "A redis pipeline that WATCHes keys or runs scripts"
        self.wrap(redis.client.Pipeline, "immediate_execute_command", _refused(watched, False))
        for cls in (redis.client.Pipeline, redis.asyncio.client.Pipeline):
            # (an async one returns its coroutine from the original: cleared as it is made)
            self.wrap(cls, "_execute_transaction", _fresh_attempt)
            self.wrap(cls, "_execute_pipeline", _fresh_attempt)
        self.wrap(redis.client.PubSub, "execute_command", _refused("Redis Pub/Sub", False))
        self.wrap(redis.asyncio.client.PubSub, "execute_command", _refused("Redis Pub/Sub", True))
        import redis.asyncio.cluster
        import redis.cluster

        self.wrap(redis.cluster.RedisCluster, "execute_command",
                  _refused("A Redis Cluster client", False))
        self.wrap(redis.asyncio.cluster.RedisCluster, "execute_command",
                  _refused("A Redis Cluster client", True))
        self.wrap(redis.asyncio.Redis, "execute_command", _async_execute_command)
        self.wrap(redis.asyncio.Redis, "parse_response", _async_parse_response)
        self.wrap(redis.asyncio.client.Pipeline, "execute", _async_pipeline_execute)
        self.wrap(redis.asyncio.client.Pipeline, "immediate_execute_command",
                  _refused(watched, True))
