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
encoder, so ``set("k", 1)`` and ``set(b"k", b"1")`` are one call) and the database number;
the server's address is not part of it. Secrets in ``AUTH``, ``HELLO ... AUTH``,
``MIGRATE ... AUTH/AUTH2``, ``CONFIG SET requirepass|masterauth`` and ``ACL SETUSER``
passwords become redaction tokens before they are stored or hashed.

Not replayed: a pipeline that WATCHes keys or runs scripts (its commands go straight to the
server through ``immediate_execute_command``) raises :class:`ReplayUnsupportedError` in
replay, and record leaves it unrecorded; Pub/Sub, cluster clients and client-side caching
are not covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import redis
import redis.asyncio

from timetracer_otel.codec import Tree, from_tree, register, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    LIVE,
    STATE,
    Shim,
    capture,
    decide,
    error_tree,
    rebuild_error,
)

LIBRARY = "redis"
SCOPE = "opentelemetry.instrumentation.redis"

# The errors of a call that never got the server's answer: recorded as the call's error.
# Any other (a ResponseError, a WatchError) comes from the reads, which replay runs again.
_UNANSWERED = (redis.ConnectionError, redis.TimeoutError, OSError)


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
    an argument (the live call then raises the client's own DataError)."""
    encode = client.get_encoder().encode
    try:
        return _redacted([_arg(a, encode) for a in args])
    except (redis.DataError, TypeError, ValueError):
        return None


def _db(client: Any) -> Any:
    return client.connection_pool.connection_kwargs.get("db", 0)


def _label(words: Sequence[str | bytes]) -> str:
    text = " ".join(w if isinstance(w, str) else repr(w) for w in words)
    return text if len(text) <= 120 else text[:117] + "..."


def _command_call(client: Any, command: list[str | bytes]) -> Call:
    request = {"db": _db(client), "command": command}
    shape = {"db": request["db"], "command": command[0], "argc": len(command)}
    return Call(LIBRARY, request, request, shape, _label(command[:2]))


def _pipeline_call(client: Any, commands: list[list[str | bytes]], transaction: bool) -> Call:
    request = {"db": _db(client), "transaction": transaction, "commands": commands}
    shape = {"db": request["db"], "transaction": transaction,
             "commands": [[c[0], len(c)] for c in commands]}
    label = _label(["MULTI" if transaction else "PIPELINE", *(c[0] for c in commands)])
    return Call(LIBRARY, request, request, shape, label)


# --- the replies -----------------------------------------------------------------------------


class _ReplyError:
    """An error inside a reply (an ``EXEC`` reply holds one per failed command)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


register(_ReplyError, "redis.error", lambda e: error_tree(e.error), rebuild_error)


def _with_errors_marked(value: Any) -> Any:
    if isinstance(value, BaseException):
        return _ReplyError(value)
    if type(value) is list and any(type(v) is list or isinstance(v, BaseException) for v in value):
        return [_with_errors_marked(v) for v in value]
    return value


def _read_tree(value: Any = None, error: BaseException | None = None) -> Tree:
    if error is not None:
        return {"error": error_tree(error)}
    return {"value": to_tree(_with_errors_marked(value))}


# The reads of the call being recorded in this task or thread (see parse_response).
_READS: ContextVar[list[Tree] | None] = ContextVar("timetracer_redis_reads", default=None)


class _Tap:
    """A live connection whose reads are kept."""

    def __init__(self, conn: Any, reads: list[Tree]) -> None:
        self._conn, self._reads = conn, reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = self._conn.read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            self._reads.append(_read_tree(error=exc))
            raise
        self._reads.append(_read_tree(value))
        return value


class _AsyncTap(_Tap):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            value = await self._conn.read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            self._reads.append(_read_tree(error=exc))
            raise
        self._reads.append(_read_tree(value))
        return value


class _Replayed:
    """A connection that never connects: it answers the recorded reads in order."""

    himport_registry = None  # (redis-py 8: no per-connection HIMPORT state to prepare)

    def __init__(self, reads: Sequence[Tree]) -> None:
        self._reads = list(reads)
        self._next = 0

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._next >= len(self._reads):
            raise redis.ResponseError("timetracer-otel: the recording holds no more replies "
                                      "for this call; record it again.")
        read = self._reads[self._next]
        self._next += 1
        if read.get("error") is not None:
            raise rebuild_error(read["error"])
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


def _recorded_reads(match: Match) -> list[Tree]:
    span = match.span
    if span.error is not None:
        raise rebuild_error(span.error)
    reads: list[Tree] = span.response["reads"]
    return reads


# --- the patched methods ---------------------------------------------------------------------


def _parse_response(original: Any) -> Any:
    def parse_response(self: Any, connection: Any, command_name: Any, **options: Any) -> Any:
        reads = _READS.get()
        if reads is not None and not isinstance(connection, _Tap | _Replayed):
            connection = _Tap(connection, reads)
        return original(self, connection, command_name, **options)

    return parse_response


def _async_parse_response(original: Any) -> Any:
    async def parse_response(self: Any, connection: Any, command_name: Any, **options: Any) -> Any:
        reads = _READS.get()
        if reads is not None and not isinstance(connection, _Tap | _Replayed):
            connection = _AsyncTap(connection, reads)
        return await original(self, connection, command_name, **options)

    return parse_response


def _execute_command(original: Any) -> Any:
    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if STATE.mode is Mode.OFF or not args:
            return original(self, *args, **options)
        command = _command(self, args)
        if command is None:
            return original(self, *args, **options)
        call = _command_call(self, command)
        action = decide(call)
        if isinstance(action, Match):
            return self.parse_response(_Replayed(_recorded_reads(action)), args[0], **options)
        if action is LIVE:
            return original(self, *args, **options)
        reads: list[Tree] = []
        with capture(call, SCOPE) as cap:
            token = _READS.set(reads)
            try:
                result = original(self, *args, **options)
            except Exception as exc:
                _finish(cap, exc, reads[-1:])
                raise
            finally:
                _READS.reset(token)
            cap.ok({"reads": reads[-1:]})  # a retried command: the attempt that answered
        return result

    return execute_command


def _async_execute_command(original: Any) -> Any:
    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if STATE.mode is Mode.OFF or not args:
            return await original(self, *args, **options)
        command = _command(self, args)
        if command is None:
            return await original(self, *args, **options)
        call = _command_call(self, command)
        action = decide(call)
        if isinstance(action, Match):
            return await self.parse_response(_AsyncReplayed(_recorded_reads(action)), args[0],
                                             **options)
        if action is LIVE:
            return await original(self, *args, **options)
        reads: list[Tree] = []
        with capture(call, SCOPE) as cap:
            token = _READS.set(reads)
            try:
                result = await original(self, *args, **options)
            except Exception as exc:
                _finish(cap, exc, reads[-1:])
                raise
            finally:
                _READS.reset(token)
            cap.ok({"reads": reads[-1:]})
        return result

    return execute_command


def _finish(cap: Any, exc: BaseException, reads: list[Tree]) -> None:
    """A call that raised: the server's answer when it gave one (replay raises it again
    through redis-py's own parsing), else the error itself."""
    if reads and not isinstance(exc, _UNANSWERED):
        cap.ok({"reads": reads})
    else:
        cap.fail(exc)


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


def _unsupported() -> ReplayUnsupportedError:
    return ReplayUnsupportedError(
        "A redis pipeline that WATCHes keys or runs scripts is not replayed; record and replay "
        "it with redis kept live (TIMETRACER_LIVE_PLUGINS=redis, or replay(live=['redis']))."
    )


def _replaying() -> bool:
    return STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY)


def _immediate(original: Any) -> Any:
    def immediate_execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if _replaying():
            raise _unsupported()
        return original(self, *args, **options)

    return immediate_execute_command


def _async_immediate(original: Any) -> Any:
    async def immediate_execute_command(self: Any, *args: Any, **options: Any) -> Any:
        if _replaying():
            raise _unsupported()
        return await original(self, *args, **options)

    return immediate_execute_command


def _pipeline_execute(original: Any) -> Any:
    def execute(self: Any, raise_on_error: bool = True) -> Any:
        if STATE.mode is Mode.OFF or not self.command_stack or self.watching or self.scripts:
            return original(self, raise_on_error)
        commands = _pipeline_commands(self)
        if commands is None:
            return original(self, raise_on_error)
        transaction = _is_transaction(self)
        call = _pipeline_call(self, commands, transaction)
        action = decide(call)
        if isinstance(action, Match):
            run = self._execute_transaction if transaction else self._execute_pipeline
            try:
                return run(_Replayed(_recorded_reads(action)), self.command_stack, raise_on_error)
            finally:
                self.reset()
        if action is LIVE:
            return original(self, raise_on_error)
        reads: list[Tree] = []
        with capture(call, SCOPE) as cap:
            token = _READS.set(reads)
            try:
                result = original(self, raise_on_error)
            except Exception as exc:
                _finish(cap, exc, reads)
                raise
            finally:
                _READS.reset(token)
            cap.ok({"reads": reads})
        return result

    return execute


def _async_pipeline_execute(original: Any) -> Any:
    async def execute(self: Any, raise_on_error: bool = True) -> Any:
        if STATE.mode is Mode.OFF or not self.command_stack or self.watching or self.scripts:
            return await original(self, raise_on_error)
        commands = _pipeline_commands(self)
        if commands is None:
            return await original(self, raise_on_error)
        transaction = _is_transaction(self)
        call = _pipeline_call(self, commands, transaction)
        action = decide(call)
        if isinstance(action, Match):
            run = self._execute_transaction if transaction else self._execute_pipeline
            try:
                return await run(_AsyncReplayed(_recorded_reads(action)), self.command_stack,
                                 raise_on_error)
            finally:
                await self.reset()
        if action is LIVE:
            return await original(self, raise_on_error)
        reads: list[Tree] = []
        with capture(call, SCOPE) as cap:
            token = _READS.set(reads)
            try:
                result = await original(self, raise_on_error)
            except Exception as exc:
                _finish(cap, exc, reads)
                raise
            finally:
                _READS.reset(token)
            cap.ok({"reads": reads})
        return result

    return execute


class RedisShim(Shim):
    library = LIBRARY
    requires = "redis"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.redis:RedisInstrumentor"

    def patch(self) -> None:
        import redis.asyncio.client
        import redis.client

        self.wrap(redis.Redis, "execute_command", _execute_command)
        self.wrap(redis.Redis, "parse_response", _parse_response)
        self.wrap(redis.client.Pipeline, "execute", _pipeline_execute)
        self.wrap(redis.client.Pipeline, "immediate_execute_command", _immediate)
        self.wrap(redis.asyncio.Redis, "execute_command", _async_execute_command)
        self.wrap(redis.asyncio.Redis, "parse_response", _async_parse_response)
        self.wrap(redis.asyncio.client.Pipeline, "execute", _async_pipeline_execute)
        self.wrap(redis.asyncio.client.Pipeline, "immediate_execute_command", _async_immediate)
