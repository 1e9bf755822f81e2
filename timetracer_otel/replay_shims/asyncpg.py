"""asyncpg: the query methods the OTel instrumentation wraps, plus connection setup.

Patched (beneath the instrumentation's wrapt wrappers, so its span is current):
``Connection.execute/executemany/fetch/fetchval/fetchrow/fetchmany``,
``PreparedStatement.fetch/fetchval/fetchrow/fetchmany/executemany``,
``Cursor.fetch/fetchrow/forward`` and ``CursorIterator.__anext__``. asyncpg's protocol is
Cython, so record keeps the *decoded* values with the typed codec, plus column names, type
oids, the status string and the transaction status after the call. Replay rebuilds real
``asyncpg.Record`` objects and raises recorded ``PostgresError`` subclasses with their fields.

Replay also needs connections without a server: ``connect_utils._connect_addr`` (used by
``asyncpg.connect`` and pools alike) returns a real ``Connection`` over :class:`_ReplayProtocol`,
which opens no socket; ``prepare``, cursors and ``set_type_codec`` are answered without it.
``copy_*`` and ``add_listener`` are refused there (ReplayUnsupportedError, counted in the
replay's report).

Besides its result, a recorded call keeps what it did to its connection, replayed with it: the
server parameters it changed (``set``: ParameterStatus, read back by ``get_settings()``), the
log messages it received (``notices``: NOTICE, WARNING..., handed to ``add_log_listener``
callbacks) and, for an error, whether the connection was closed then (``closed``: the server
ended it). Query loggers (``add_query_logger``) are called for replayed Connection methods as
asyncpg calls them live. Composite values (asyncpg ``Record`` cells) and the subclasses of
builtins a custom codec returns are kept by the codec (``$asyncpg.Record``, ``$subclass``).

A miss that ``on_miss`` lets go live (``passthrough``/``record``) on such a connection runs on
a real connection opened then, at the first such miss, with the arguments the app gave to
``connect`` (each pooled connection gets its own), bounded by its connect ``timeout``; later
misses reuse it, closing the app's connection closes it, and the codecs the app set are set on
it too. Inside a replayed transaction it begins one with the replayed ``BEGIN ...`` text (read
only, isolation level), committed or rolled back with the replayed COMMIT/ROLLBACK. Other
replayed session state (``SET``, savepoints, temporary tables, prepared statements by name) is
not on it. A server-side cursor's miss, or one whose connection cannot be opened, fails as
before ("could not go live", :func:`~timetracer_otel.replay_shims.base.stranded`).
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg import connect_utils, cursor, prepared_stmt
from asyncpg import connection as connection_module
from asyncpg.connection import Connection
from asyncpg.exceptions import PostgresError
from asyncpg.exceptions._base import InterfaceMessage, PostgresMessage
from asyncpg.pgproto import pgproto
from asyncpg.protocol.protocol import _create_record
from asyncpg.protocol.record import RecordDescriptor
from asyncpg.types import Attribute, Type
from opentelemetry.instrumentation.utils import suppress_instrumentation

from timetracer_otel.codec import (
    Tree,
    as_bytes,
    exact_encoder,
    from_tree,
    from_trees,
    register,
    to_tree,
    to_tree_typed,
    typed_trees,
)
from timetracer_otel.config import Mode
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims import base
from timetracer_otel.replay_shims.base import (
    LIVE,
    STATE,
    Deferrable,
    Shim,
    answer_cancelled,
    capture,
    decide,
    rebuild_error,
    stranded,
    unsupported,
    was_cancelled,
)
from timetracer_otel.sql import begins_transaction, sql_call

SCOPE = "opentelemetry.instrumentation.asyncpg"
LIBRARY = "asyncpg"
# Queries, recorded with their result trees (see base.Deferrable).
_recording = Deferrable(LIBRARY, SCOPE)
# Server parameters a replayed connection reports through ``get_settings()``.
_SERVER_PARAMS = (
    "server_version", "server_encoding", "client_encoding", "DateStyle", "IntervalStyle",
    "TimeZone", "integer_datetimes", "standard_conforming_strings", "is_superuser",
    "session_authorization", "application_name", "default_transaction_read_only",
    "in_hot_standby",
)
log = logging.getLogger("timetracer_otel")
_UNSUPPORTED = (
    "asyncpg {what} is not supported in replay; keep asyncpg live for this code with "
    "TIMETRACER_LIVE_PLUGINS=asyncpg (or on_miss='passthrough')."
)


def _refused(what: str) -> ReplayUnsupportedError:
    """The error for an operation replay cannot do, counted in the replay's report."""
    return unsupported(_UNSUPPORTED.format(what=what), f"asyncpg {what}")

# asyncpg decodes uuid columns to its own uuid.UUID subclass; replay keeps that type.
register(pgproto.UUID, "asyncpg.UUID", str, pgproto.UUID)


# --- a connection without a server ------------------------------------------------------------


class _ReplaySettings:
    """The recorded server parameters, read the way asyncpg's ``ConnectionSettings`` is."""

    def __init__(self, params: dict[str, str]) -> None:
        self._params = dict(params)  # (its own: a replayed SET changes this connection's only)

    def __getattr__(self, name: str) -> str:
        try:
            return self.__dict__["_params"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None

    # Codec bookkeeping: values come back already decoded, so there is nothing to register.
    def add_python_codec(self, *args: Any, **kwargs: Any) -> None: ...
    def remove_python_codec(self, *args: Any, **kwargs: Any) -> None: ...
    def set_builtin_type_codec(self, *args: Any, **kwargs: Any) -> None: ...
    def clear_type_cache(self) -> None: ...
    def register_data_types(self, *args: Any) -> None: ...


class _ReplayProtocol:
    """Stands in for asyncpg's Cython protocol on a replayed connection: it opens no socket,
    and its transaction status follows the recorded calls."""

    def __init__(self, server: Tree, record_class: type[Any],
                 connect: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.settings = _ReplaySettings(server["params"])
        self.record_class = record_class
        self.backend_pid = server["pid"]
        self.backend_secret = 0
        self.xact = False
        self.connected = True
        self.queries_count = 0
        # The real connection a miss goes live on (see _live_connection): how to open it, the
        # codec calls to repeat on it, it once open, and why it could not be opened.
        self.connect = connect
        self.codecs: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
        self.live: Any = None
        self.live_error: BaseException | None = None
        # The replayed command that began the current transaction (``BEGIN ISOLATION LEVEL
        # SERIALIZABLE READ ONLY``...), for the real connection to begin its own the same way.
        self.begin: str | None = None

    def get_settings(self) -> _ReplaySettings:
        return self.settings

    def get_record_class(self) -> type[Any]:
        return self.record_class

    def get_server_pid(self) -> int:
        return self.backend_pid  # type: ignore[no-any-return]

    def is_in_transaction(self) -> bool:
        return self.xact

    def is_connected(self) -> bool:
        return self.connected

    def is_closed(self) -> bool:
        return not self.connected

    def set_connection(self, connection: Any) -> None: ...

    def _is_cancelling(self) -> bool:
        return False

    async def _wait_for_cancellation(self) -> None: ...

    def _get_timeout(self, timeout: float | None) -> float | None:
        return timeout

    async def close(self, timeout: float | None = None) -> None:
        self.connected = False
        live, self.live = self.live, None
        if live is not None:
            await live.close(timeout=timeout)

    def abort(self) -> None:
        self.connected = False
        live, self.live = self.live, None
        if live is not None:
            live.terminate()

    def __getattr__(self, name: str) -> Any:
        # Protocol operations no shim answers (COPY, LISTEN payloads...) fail clearly.
        raise _refused(f"protocol operation {name!r}")


class _ReplayState:
    """A prepared statement's state on a replayed connection: the recorded description."""

    def __init__(self, query: str, name: str, record_class: type[Any], desc: Tree) -> None:
        self.query = query
        self.name = name
        self.record_class = record_class
        self.ignore_custom_codec = False
        self.closed = False
        self.refs = 0
        self.desc = desc

    def attach(self) -> None:
        self.refs += 1

    def detach(self) -> None:
        self.refs -= 1

    def mark_closed(self) -> None:
        self.closed = True

    def mark_unprepared(self) -> None: ...

    def _get_parameters(self) -> tuple[Type, ...]:
        return tuple(Type(*t) for t in (self.desc or {}).get("params", ()))

    def _get_attributes(self) -> tuple[Attribute, ...]:
        return tuple(Attribute(a[0], Type(*a[1:])) for a in (self.desc or {}).get("attrs", ()))


def _is_replay_conn(conn: Any) -> bool:
    return isinstance(conn._protocol, _ReplayProtocol)


def _server_tree(conn: Any) -> Tree:
    settings = conn._protocol.get_settings()
    params = {}
    for name in _SERVER_PARAMS:
        value = getattr(settings, name, None)
        if value is not None:
            params[name] = value
    return {"params": params, "pid": conn.get_server_pid()}


def _connect_call(params: Any) -> Call:
    identity = {"db": params.database, "user": params.user, "op": "connect"}
    return Call(LIBRARY, identity, identity, identity, f"connect {params.database}")


# Server parameters of the last replayed connection per database: a pool that opens more
# connections than were recorded (timing-dependent reconnects) reuses them.
_servers: dict[str | None, Tree] = {}


# The timeout the app gave asyncpg.connect (its default otherwise), which bounds the whole
# connect there, out of _connect_addr's sight: kept by the connect wrapper for the real
# connection a miss opens later (see _live_connection), bounded the same.
_DEFAULT_CONNECT_TIMEOUT = 60.0  # asyncpg.connect's own
_CONNECT_TIMEOUT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "timetracer_asyncpg_connect_timeout", default=_DEFAULT_CONNECT_TIMEOUT)


def _connect(original: Any) -> Any:
    @functools.wraps(original)
    async def connect(*args: Any, **kwargs: Any) -> Any:
        token = _CONNECT_TIMEOUT.set(kwargs.get("timeout", _DEFAULT_CONNECT_TIMEOUT))
        try:
            return await original(*args, **kwargs)
        finally:
            _CONNECT_TIMEOUT.reset(token)

    return connect


def _connect_addr(original: Any) -> Any:
    async def connect_addr(**kwargs: Any) -> Any:
        if STATE.mode is Mode.OFF:
            return await original(**kwargs)
        params = kwargs["params"]
        call = _connect_call(params)
        timeout = _CONNECT_TIMEOUT.get()

        async def connect() -> Any:  # the real connection, for a miss that goes live
            # With the app's arguments and config, bounded by its connect timeout.
            return await asyncio.wait_for(
                original(**{**kwargs, "connection_class": Connection}), timeout)

        if STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY):
            match = STATE.index.take(call) if STATE.index is not None else None
            if match is None and params.database in _servers:
                return _replay_connection(kwargs, _servers[params.database], connect)
            action: Match | Any = match or decide(call)
        else:
            action = decide(call)
        if isinstance(action, Match):
            if action.span.error is not None:
                raise rebuild_error(action.span.error, _build_error)
            _servers[params.database] = action.span.response
            return _replay_connection(kwargs, action.span.response, connect)
        if action is LIVE:
            return await original(**kwargs)
        with capture(call, SCOPE) as cap:
            try:
                conn = await original(**kwargs)
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc, None))
                raise
            cap.ok(_server_tree(conn))
        return conn

    return connect_addr


def _replay_connection(kwargs: dict[str, Any], server: Tree,
                       connect: Callable[[], Awaitable[Any]]) -> Any:
    proto = _ReplayProtocol(server, kwargs["record_class"], connect)
    conn = kwargs["connection_class"](
        proto, None, kwargs["loop"], kwargs["addr"], kwargs["config"], kwargs["params"]
    )
    proto.set_connection(conn)
    return conn


# --- results: record side ---------------------------------------------------------------------


# Text, bools, NULLs and PostgreSQL integers (at most 64-bit) are tree leaves as they are;
# every other value goes through the codec.
_PLAIN = frozenset({str, bool, int, type(None)})


def _rows_tree(rows: list[Any], tree: dict[str, Any]) -> dict[str, Any]:
    """The rows as lists of tree cells: plain values as they are, every other value through
    the codec (through its encoder for the cell's type when it has one of its own).

    Column by column, in C: a column holds one PostgreSQL type, so its Python types are read
    with one ``set(map(type, ...))`` and only a column with a value the codec must encode is
    mapped (NULLs, and a custom codec, can put other types beside that one). A per-cell test
    in Python was a third of what recording a 10-row fetch of three columns added to the
    request path (674 of 2,017 bytecodes)."""
    if not rows:
        tree["rows"] = []
        return tree
    tree["cols"] = list(rows[0].keys())
    plain = _PLAIN
    columns: list[Any] = []
    mapped = False
    for column in zip(*rows, strict=True):
        types = set(map(type, column))
        if types <= plain:
            if int in types and _beyond_64_bits(column):  # (a custom codec's numeric)
                mapped = True
                columns.append(map(to_tree, column))
            else:
                columns.append(column)
            continue
        mapped = True
        coded = types - plain
        if len(coded) == 1 and len(types) == 1:  # one type, no NULL: its encoder on each cell
            cls = next(iter(coded))
            columns.append(map(exact_encoder(cls) or to_tree, column))
        else:
            columns.append(map(_cell, column))
    if mapped:  # (values the app received: a builtin's subclass keeps its class)
        tree["rows"] = typed_trees(lambda: list(map(list, zip(*columns, strict=True))))
    else:
        tree["rows"] = list(map(list, rows))
    return tree


def _beyond_64_bits(column: tuple[Any, ...]) -> bool:
    """Whether an int of ``column`` is one msgpack cannot carry as it is (the codec tags it):
    the least and greatest found in C; cell by cell only where other values sit beside them."""
    present = [v for v in filter(None, column) if v is not True]  # (NULLs, 0 and False out)
    try:
        return bool(present) and (min(present) < _INT_MIN or max(present) > _INT_MAX)
    except TypeError:  # text beside the ints (a codec that decodes to either)
        return any(type(v) is int and not _INT_MIN <= v <= _INT_MAX for v in column)


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _cell(v: Any) -> Any:
    return v if type(v) in _PLAIN else (exact_encoder(type(v)) or to_tree)(v)


# Column oids per prepared statement state; asyncpg builds its attribute tuples on every call.
_oid_cache: dict[Any, list[int]] = {}


def _stmt_oids(state: Any) -> list[int]:
    oids = _oid_cache.get(state)
    if oids is None:
        if len(_oid_cache) > 1024:
            _oid_cache.clear()
        oids = _oid_cache[state] = [a.type.oid for a in state._get_attributes()]
    return oids


def _oids(conn: Any, query: str, record_class: Any) -> list[int] | None:
    """Column type oids when the statement sits in asyncpg's cache (a dict lookup)."""
    cls = record_class or conn._protocol.get_record_class()
    stmt = conn._stmt_cache.get((query, cls, False), promote=False)
    return _stmt_oids(stmt) if stmt is not None else None


def _result_tree(
    kind: str, out: Any, conn: Any, query: str, record_class: Any
) -> dict[str, Any]:
    tree: dict[str, Any] = {"tx": conn._protocol.is_in_transaction()}
    if kind == "status":
        tree["status"] = out
    elif kind == "rows":
        _rows_tree(out, tree)
    elif kind == "row":
        _rows_tree([] if out is None else [out], tree)
    elif kind in ("value", "int"):
        tree["value"] = to_tree(out) if type(out) in _PLAIN else to_tree_typed(out)
    if kind in ("rows", "row") and not isinstance(conn._protocol, _ReplayProtocol):
        tree["oids"] = _oids(conn, query, record_class) if out else None
    return tree


def _error_attrs(exc: BaseException, conn: Any) -> Tree:
    attrs: dict[str, Any] = {}
    if isinstance(exc, PostgresError):
        attrs["fields"] = {k: to_tree(v) for k, v in exc.as_dict().items()}
        attrs["query"] = getattr(exc, "query", None)
    elif isinstance(exc, InterfaceMessage):  # client-side errors (InterfaceError, DataError)
        attrs["fields"] = {"detail": to_tree(exc.detail), "hint": to_tree(exc.hint)}
    if conn is not None and conn._protocol is not None:
        attrs["tx"] = conn._protocol.is_in_transaction()
    if conn is not None and conn.is_closed():  # (the server ended it, the call found it so...)
        attrs["closed"] = True
    return attrs


# --- what a call did to its connection besides its result -------------------------------------


def _server_params(conn: Any) -> dict[str, str] | None:
    """The dict in which asyncpg keeps the server's reported parameters (ParameterStatus:
    ``get_settings()``); a Cython attribute, reached through the settings' references."""
    proto = conn._protocol
    if proto is None or isinstance(proto, _ReplayProtocol):
        return None
    for ref in gc.get_referents(proto.get_settings()):
        if type(ref) is dict and "server_version" in ref:
            return ref
    return None


# The server's log messages (NOTICE, WARNING...) each connection received while recording,
# by connection, as PostgresMessage.as_dict() names them: taken by the call they came with.
_notices: dict[Any, list[dict[str, str]]] = {}
_FIELD_NAMES: dict[str, str] = dict(type(PostgresMessage)._field_map)
_FIELD_CODES = {name: code for code, name in _FIELD_NAMES.items()}


def _process_log_message(original: Any) -> Any:
    def process(self: Connection, fields: dict[str, str], last_query: Any) -> Any:
        if STATE.mode is not Mode.OFF and not _is_replay_conn(self):
            if len(_notices) > 256:  # (connections that made no recorded call since)
                _notices.clear()
            received = _notices.setdefault(self, [])
            if len(received) < 10_000:  # (bounded: one call's messages are kept)
                received.append({_FIELD_NAMES[k]: v for k, v in fields.items()
                                 if k in _FIELD_NAMES})
        return original(self, fields, last_query)

    return process


def _effects(tree: dict[str, Any], target: Any, params: dict[str, str] | None,
             before: dict[str, str] | None) -> None:
    """Add to a call's recorded outcome the server parameters it changed (``set``: what a
    ``SET TimeZone`` reports) and the log messages it received (``notices``)."""
    if params is not None and before is not None and params != before:
        tree["set"] = {k: v for k, v in params.items() if before.get(k) != v}
    if _notices:
        notices = _notices.pop(target, None)
        if notices:
            tree["notices"] = notices


def _mark_closed(conn: Any, proto: _ReplayProtocol) -> None:
    """A replayed connection the server had ended when the call was recorded: closed now,
    cleaned up as asyncpg does when it loses its connection."""
    proto.connected = False
    live, proto.live = proto.live, None
    if live is not None:
        live.terminate()
    conn._cleanup()


async def _deliver_notices(conn: Any, tree: Tree, query: str) -> None:
    """The log messages a recorded call received, to the connection's log listeners as
    asyncpg hands them (each scheduled with the message it builds), before the call returns."""
    notices = tree.get("notices") if isinstance(tree, dict) else None
    if not notices or not conn._log_listeners:
        return
    _hand_notices(conn, notices, query)
    await asyncio.sleep(0)  # (live, they run before the app resumes)


def _hand_notices(conn: Any, notices: list[dict[str, str]], query: str) -> None:
    """Recorded log messages to asyncpg's own handling, which builds each message's class and
    schedules the connection's listeners with it."""
    for fields in notices:
        conn._process_log_message(
            {_FIELD_CODES[k]: v for k, v in fields.items() if k in _FIELD_CODES}, query)


# --- results: replay side ---------------------------------------------------------------------


def _build_error(cls: type[BaseException], tree: Tree) -> BaseException:
    attrs = tree.get("attrs") or {}
    # str() of a PostgresError appends its detail; the constructor takes the bare message.
    args = from_tree(tree["args"]) if tree.get("args") is not None else (tree["message"],)
    try:
        exc = cls(*args)
    except Exception:
        exc = cls.__new__(cls)
        BaseException.__init__(exc, *args)
    if "fields" in attrs:
        exc.__dict__.update({k: from_tree(v) for k, v in attrs["fields"].items()})
    if "query" in attrs:  # (a PostgresError's; an InterfaceError has none)
        exc.__dict__["query"] = attrs["query"]
    return exc


def _item_offset() -> int | None:
    """Where a Record keeps its item pointers, found by probing one asyncpg built itself;
    None (custom record classes refused) if the layout is not the expected one."""
    a, b = object(), object()
    rec = _create_record({"a": 0, "b": 1}, (a, b))
    words = (ctypes.c_void_p * ((type(rec).__basicsize__ + 2 * type(rec).__itemsize__) // 8))
    view = words.from_address(id(rec))
    for i in range(len(view) - 1):
        if view[i] == id(a) and view[i + 1] == id(b):
            return i * 8
    return None


_ITEMS = _item_offset()


def _custom_record(cls: type[Any], desc: Any, values: tuple[Any, ...]) -> Any:
    # What asyncpg's decoder does for a custom record_class: make_record(cls, n), then
    # ApgRecord_SET_ITEM (a pointer store) for each value, with a reference taken.
    assert _ITEMS is not None
    rec = desc.make_record(cls, len(values))
    slots = (ctypes.c_void_p * len(values)).from_address(id(rec) + _ITEMS)
    for i, v in enumerate(values):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(v))
        slots[i] = id(v)
    return rec


def _records(tree: Tree, record_class: Any) -> list[Any]:
    custom = record_class is not None and record_class is not asyncpg.Record
    cols = tuple(tree.get("cols") or ())
    # A name twice (a join's two ``id`` columns): asyncpg's own mapping, the last index for
    # the name, and every name in order for keys(), items() and repr().
    mapping = {name: i for i, name in enumerate(cols)}
    repeated = len(mapping) != len(cols)
    if (custom or repeated) and _ITEMS is None:
        what = (f"the custom record_class {record_class.__qualname__}" if custom
                else "a record whose columns repeat a name")
        raise unsupported(
            f"Replay cannot build {what} with this asyncpg version; use the default record "
            "class and distinct column names in replayed code, or keep asyncpg live with "
            "TIMETRACER_LIVE_PLUGINS=asyncpg.",
            f"asyncpg {what}",
        )
    rows = _row_tuples(tree["rows"])
    if custom or repeated:
        desc = RecordDescriptor(mapping, cols)
        cls = record_class if custom else asyncpg.Record
        return [_custom_record(cls, desc, row) for row in rows]
    return [_create_record(mapping, row) for row in rows]


def _row_tuples(rows: list[list[Any]]) -> list[tuple[Any, ...]]:
    """Recorded rows as tuples of values, the reverse of :func:`_rows_tree`: column by
    column in C, the codec only on a column holding a coded cell (a dict or a list)."""
    columns: list[Any] = []
    decoded = False
    for column in zip(*rows, strict=True):
        types = set(map(type, column))
        if dict in types or list in types:
            decoded = True
            columns.append(from_trees(column))
        else:
            columns.append(column)
    return list(zip(*columns, strict=True)) if decoded else list(map(tuple, rows))


def _replayed(match: Match, kind: str, conn: Any, record_class: Any) -> Any:
    span = match.span
    tree = span.response if span.error is None else (span.error.get("attrs") or {})
    proto = conn._protocol
    if isinstance(proto, _ReplayProtocol):
        proto.queries_count += 1
        if "tx" in tree:
            proto.xact = tree["tx"]
        if "set" in tree:  # the server parameters the call changed (SET TimeZone...)
            proto.settings._params.update(tree["set"])
    if span.error is not None:
        if tree.get("closed") and isinstance(proto, _ReplayProtocol):
            _mark_closed(conn, proto)
        raise rebuild_error(span.error, _build_error)
    if tree.get("stop"):
        raise StopAsyncIteration
    if kind == "status":
        return tree["status"]
    cls = record_class or proto.get_record_class()
    if kind == "rows":
        return _records(tree, cls)
    if kind == "row":
        rows = _records(tree, cls)
        return rows[0] if rows else None
    if kind in ("value", "int"):
        return from_tree(tree["value"])
    return None


async def _live_connection(conn: Any, call: Call) -> Any:
    """The real connection a miss on the replayed ``conn`` goes live on, opened at the first
    such miss with the app's connect arguments; :func:`stranded` when it cannot be opened.
    Inside a replayed transaction, it is in one too."""
    proto = conn._protocol
    live = proto.live
    if live is None:
        if proto.connect is None or proto.live_error is not None:
            raise stranded(call) from proto.live_error
        try:
            with suppress_instrumentation():  # timetracer's and OTel's: not the app's own calls
                live = await proto.connect()
                for method, args, kwargs in proto.codecs:
                    await method(live, *args, **kwargs)
        except Exception as exc:
            proto.live_error = exc
            if live is not None:
                live.terminate()
            raise stranded(call) from exc
        proto.live = live
        log.info("asyncpg: %s had no recording; opened a real connection for it (replayed "
                 "session state such as SET is not on it)", call.label)
    if proto.xact and not live.is_in_transaction():
        # Begun as the app's was (READ ONLY, its isolation level...): a miss in a read-only
        # transaction must not write to the real database.
        with suppress_instrumentation():
            await live.execute(proto.begin or "BEGIN")
    return live


def _note_begin(proto: _ReplayProtocol, query: str) -> None:
    """Keep the replayed command that began a transaction (see ``_ReplayProtocol.begin``)."""
    if not proto.xact:
        proto.begin = None
        return
    if begins_transaction(query):
        proto.begin = query


async def _end_live_transaction(proto: _ReplayProtocol, match: Match) -> None:
    """A replayed COMMIT/ROLLBACK ended the transaction the real connection mirrors: end it."""
    live = proto.live
    if live is None or proto.xact or not live.is_in_transaction():
        return
    status = str((match.span.response or {}).get("status") or "")
    with suppress_instrumentation():
        await live.execute("ROLLBACK" if status.upper().startswith("ROLLBACK") else "COMMIT")


async def _run(
    call: Call,
    kind: str,
    conn: Any,
    query: str,
    record_class: Any,
    invoke: Callable[[Any], Awaitable[Any]] | None,
    on_replay: Callable[[Match], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    logged: tuple[Any, Any] | None = None,
) -> Any:
    """One query: replay it, call it live, or call it and record its result. ``invoke(c)``
    makes the call on connection ``c``: the app's, or for a miss on a replayed connection the
    real one behind it (None where a miss cannot go live there). ``logged``: the arguments and
    timeout asyncpg gives the connection's query loggers for this call (Connection methods)."""
    action = decide(call)
    if isinstance(action, Match):
        if was_cancelled(action.span):
            return await answer_cancelled(action.span)
        if on_replay is not None:
            on_replay(action)
        proto = conn._protocol
        try:
            if logged is not None and conn._query_loggers:  # as asyncpg calls them live
                with conn._time_and_log(query, *logged):
                    await _deliver_notices(conn, _outcome(action), query)
                    return _replayed(action, kind, conn, record_class)
            await _deliver_notices(conn, _outcome(action), query)
            return _replayed(action, kind, conn, record_class)
        finally:
            if isinstance(proto, _ReplayProtocol):
                _note_begin(proto, query)
            if isinstance(proto, _ReplayProtocol) and proto.live is not None:
                await _end_live_transaction(proto, action)
    target = conn
    if _is_replay_conn(conn):  # a miss under on_miss=passthrough/record
        if invoke is None:
            raise stranded(call)
        target = await _live_connection(conn, call)

    async def run() -> Any:
        assert invoke is not None
        if target is conn:
            return await invoke(conn)
        with suppress_instrumentation():  # what the call does inside is not the app's own
            if logged is not None and conn._query_loggers:  # the app's loggers, as live
                with conn._time_and_log(query, *logged):
                    return await invoke(target)
            return await invoke(target)

    if action is LIVE:
        try:
            return await run()
        finally:
            if _notices:
                _notices.pop(target, None)  # (a call not recorded: its messages are not kept)
    with _recording(call) as cap:  # left to the writer where it can be (base.Deferrable)
        # What else the call does to its connection: server parameters it changes (asyncpg's
        # dict of them, compared after: one C copy and compare) and log messages it receives.
        params = _server_params(target)
        before = params.copy() if params is not None else None
        if _notices:
            _notices.pop(target, None)  # (received before this call: not its own)
        try:
            out = await run()
        except StopAsyncIteration:
            tree = {"tx": conn._protocol.is_in_transaction(), "stop": True}
            _effects(tree, target, params, before)
            cap.ok(tree)
            raise
        except Exception as exc:
            attrs = _error_attrs(exc, conn)
            _effects(attrs, target, params, before)
            if target is not conn:
                _forward(conn, attrs, query)
            cap.fail(exc, attrs)
            raise
        except asyncio.CancelledError as exc:  # (kept: the recording's order stays the live one)
            cap.fail(exc)
            raise
        tree = _result_tree(kind, out, target, query, record_class)
        tree["tx"] = conn._protocol.is_in_transaction()
        _effects(tree, target, params, before)
        if target is not conn:
            _forward(conn, tree, query)
        if on_record is not None:
            on_record(tree)
        cap.ok(tree)
    return out


def _outcome(match: Match) -> Tree:
    span = match.span
    return span.response if span.error is None else (span.error.get("attrs") or {})


def _forward(conn: Any, tree: dict[str, Any], query: str) -> None:
    """A miss recorded on the real connection behind a replayed one: what it did to that
    connection reaches the app's (its settings, its log listeners) as it will in a replay."""
    if not isinstance(conn._protocol, _ReplayProtocol):
        return
    if "set" in tree:
        conn._protocol.settings._params.update(tree["set"])
    _hand_notices(conn, tree.get("notices") or [], query)


def _many(args: Any) -> list[Any]:
    """executemany/fetchmany argument lists, materialised once (they may be generators)."""
    return [tuple(a) if isinstance(a, asyncpg.Record) else a for a in args]


# --- Connection methods -----------------------------------------------------------------------

# method -> (result kind, whether the parameters are a list of argument tuples)
_CONNECTION_METHODS = {
    "execute": ("status", False),
    "executemany": ("none", True),
    "fetch": ("rows", False),
    "fetchval": ("value", False),
    "fetchrow": ("row", False),
    "fetchmany": ("rows", True),
}


def _connection_method(op: str) -> Callable[[Any], Any]:
    kind, many = _CONNECTION_METHODS[op]

    def make(original: Any) -> Any:
        async def method(self: Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            if STATE.mode is Mode.OFF:
                return await original(self, query, *args, **kwargs)
            if many:
                args = (_many(args[0] if args else kwargs.pop("args")),)
            params = args[0] if many else args
            extra = {"column": kwargs["column"]} if kwargs.get("column") else None
            call = sql_call(LIBRARY, query, params, database=self._params.database,
                            operation=op, extra=extra)
            if STATE.mode is Mode.REPLAY and _is_replay_conn(self):
                self._check_open()
            # What asyncpg gives its query loggers: a query without arguments goes the simple
            # query protocol's way, with the timeout as given; others with the command's.
            logged = None
            if self._query_loggers:
                timeout = kwargs.get("timeout")
                logged = ((), timeout) if op == "execute" and not args else \
                    (params, _command_timeout(self, timeout))
            return await _run(call, kind, self, query, kwargs.get("record_class"),
                              lambda c: original(c, query, *args, **kwargs), logged=logged)

        method.__name__ = op
        return method

    return make


def _command_timeout(conn: Connection, timeout: Any) -> Any:
    """The timeout asyncpg's protocol makes of the one given (``_get_timeout``), as its query
    loggers see it: the connection's command timeout when None, else as a float."""
    if timeout is None:
        timeout = conn._config.command_timeout
    try:
        return None if timeout is None else float(timeout)
    except (TypeError, ValueError):  # (asyncpg raises for it itself)
        return timeout


# Connection._prepare beneath the shim, for statements a miss prepares on a real connection.
_PREPARE: list[Any] = []


def _prepare(original: Any) -> Any:
    _PREPARE[:] = [original]

    async def _prepare(self: Connection, query: str, **kwargs: Any) -> Any:
        if STATE.mode is Mode.OFF:
            return await original(self, query, **kwargs)
        call = sql_call(LIBRARY, query, None, database=self._params.database, operation="prepare")
        described = base.STATEMENTS.get(call.key) if STATE.mode is Mode.REPLAY \
            and _is_replay_conn(self) and not STATE.is_live(LIBRARY) else None
        # Prepared again on a fresh replayed connection (see base.STATEMENTS): its own
        # recorded prepare if this request has one, else (None) the statement's description.
        index = STATE.index
        action: Any = index.take(call) if described is not None and index is not None \
            else decide(call)
        if isinstance(action, Match) or action is None:
            self._check_open()
            if action is not None and action.span.error is not None:
                raise rebuild_error(action.span.error, _build_error)
            record_class = kwargs.get("record_class") or self._protocol.get_record_class()
            name = kwargs.get("name")
            state = _ReplayState(query, name if isinstance(name, str) else
                                 self._get_unique_id("stmt"), record_class,
                                 action.span.response if action is not None else described)
            return prepared_stmt.PreparedStatement(self, query, state)
        target = self
        if _is_replay_conn(self):  # a miss going live: on the real connection behind it
            self._check_open()
            target = await _live_connection(self, call)

        async def prepare() -> Any:
            if target is self:
                return await original(self, query, **kwargs)
            with suppress_instrumentation():
                return await original(target, query, **kwargs)

        if action is LIVE:
            return await prepare()
        with _recording(call) as cap:
            try:
                stmt = await prepare()
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc, self))
                raise
            cap.ok({
                "attrs": [[a.name, *a.type] for a in stmt.get_attributes()],
                "params": [list(t) for t in stmt.get_parameters()],
            })
        return stmt

    return _prepare


def _codec_method(original: Any) -> Any:
    async def method(self: Connection, *args: Any, **kwargs: Any) -> Any:
        if _is_replay_conn(self):
            self._check_open()  # values replay already decoded: no codec to register
            proto = self._protocol
            proto.codecs.append((original, args, kwargs))  # but a real connection needs it
            if proto.live is not None:
                with suppress_instrumentation():
                    await original(proto.live, *args, **kwargs)
            return None
        return await original(self, *args, **kwargs)

    return method


def _copy_method(original: Any) -> Any:
    async def method(self: Connection, *args: Any, **kwargs: Any) -> Any:
        if STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY):
            raise _refused(original.__name__)
        return await original(self, *args, **kwargs)

    return method


def _add_listener(original: Any) -> Any:
    # Notifications come from the server: a replayed connection (or the real one a miss opens
    # behind it) would never deliver one to the app's callback. Refused, not silent.
    async def add_listener(self: Connection, channel: str, callback: Any) -> Any:
        if _is_replay_conn(self):
            raise _refused("add_listener (LISTEN notifications)")
        return await original(self, channel, callback)

    return add_listener


# --- PreparedStatement methods ----------------------------------------------------------------

_STATEMENT_METHODS = {
    "fetch": ("rows", False),
    "fetchval": ("value", False),
    "fetchrow": ("row", False),
    "fetchmany": ("rows", True),
    "executemany": ("none", True),
}


def _statement_method(op: str) -> Callable[[Any], Any]:
    kind, many = _STATEMENT_METHODS[op]

    def make(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
            if STATE.mode is Mode.OFF:
                return original(self, *args, **kwargs)  # type: ignore[no-any-return]
            return _statement_call(self, original, op, kind, many, args, kwargs)

        method.__name__ = op
        return method

    return make


async def _statement_call(
    stmt: Any, original: Any, op: str, kind: str, many: bool, args: Any, kwargs: dict[str, Any]
) -> Any:
    conn = stmt._connection
    if many:
        args = (_many(args[0] if args else kwargs.pop("args")),)
    extra = {"column": kwargs["column"]} if kwargs.get("column") else None
    call = sql_call(LIBRARY, stmt._query, args[0] if many else args,
                    database=conn._params.database, operation="stmt." + op, extra=extra)
    if STATE.mode is Mode.REPLAY and isinstance(stmt._state, _ReplayState):
        stmt._check_conn_validity(op)

    def set_status(match: Match) -> None:
        status = (match.span.response or {}).get("last_status")
        stmt._last_status = as_bytes(status) if status is not None else None

    def add_status(tree: dict[str, Any]) -> None:
        # SQLAlchemy reads rowcount from the status of the last execution.
        tree["last_status"] = stmt._last_status
        if "rows" in tree:
            tree["oids"] = _stmt_oids(stmt._state)

    async def invoke(target: Any) -> Any:
        if target is conn:
            return await original(stmt, *args, **kwargs)
        # A statement replay prepared, missing now: prepared on the real connection.
        live = await _PREPARE[0](target, stmt._query, use_cache=True,
                                 record_class=stmt._state.record_class)
        try:
            return await original(live, *args, **kwargs)
        finally:
            stmt._last_status = live._last_status

    return await _run(call, kind, conn, stmt._query, stmt._state.record_class,
                      invoke, set_status, add_status)


# --- cursors ----------------------------------------------------------------------------------


def _cursor_init(original: Any) -> Any:
    async def _init(self: Any, timeout: float | None) -> Any:
        conn = self._connection
        if not _is_replay_conn(conn):
            return await original(self, timeout)
        if self._state is None:
            self._state = _ReplayState(self._query, conn._get_unique_id("stmt"),
                                       self._record_class or conn._protocol.get_record_class(), None)
            self._state.attach()
        self._check_ready()
        self._portal_name = conn._get_unique_id("portal")
        return self

    return _init


# method -> (key operation, result kind, whether it takes a row count)
_CURSOR_METHODS = {
    "fetch": ("cursor.fetch", "rows", True),
    "fetchrow": ("cursor.fetchrow", "row", False),
    "forward": ("cursor.forward", "int", True),
    "__anext__": ("cursor.next", "row", False),
}


def _cursor_method(name: str) -> Callable[[Any], Any]:
    op, kind, counted = _CURSOR_METHODS[name]

    def make(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]:
            if STATE.mode is Mode.OFF:
                return original(self, *args, **kwargs)  # type: ignore[no-any-return]
            return _cursor_call(self, original, op, kind, counted, args, kwargs)

        method.__name__ = name
        return method

    return make


async def _cursor_call(
    cur: Any, original: Any, op: str, kind: str, counted: bool, args: Any, kwargs: dict[str, Any]
) -> Any:
    conn = cur._connection
    extra = {"n": args[0] if args else kwargs.get("n")} if counted else None
    call = sql_call(LIBRARY, cur._query, cur._args, database=conn._params.database,
                    operation=op, extra=extra)
    if STATE.mode is Mode.REPLAY and _is_replay_conn(conn):
        cur._check_conn_validity(op)
    # A cursor's portal lives in its transaction: a miss on a replayed one cannot go live.
    replayed = _is_replay_conn(conn)
    return await _run(call, kind, conn, cur._query, cur._record_class,
                      None if replayed else lambda c: original(cur, *args, **kwargs))


# --- the shim ---------------------------------------------------------------------------------


class AsyncpgShim(Shim):
    library = LIBRARY
    requires = "asyncpg"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.asyncpg:AsyncPGInstrumentor"

    def patch(self) -> None:
        self.wrap(connect_utils, "_connect_addr", _connect_addr)
        self.wrap(connection_module, "connect", _connect)
        self.wrap(asyncpg, "connect", _connect)
        for op in _CONNECTION_METHODS:
            self.wrap(Connection, op, _connection_method(op))
        self.wrap(Connection, "_prepare", _prepare)
        for name in ("set_type_codec", "reset_type_codec", "set_builtin_type_codec"):
            self.wrap(Connection, name, _codec_method)
        for name in ("copy_from_table", "copy_from_query", "copy_to_table",
                     "copy_records_to_table"):
            self.wrap(Connection, name, _copy_method)
        self.wrap(Connection, "add_listener", _add_listener)
        self.wrap(Connection, "_process_log_message", _process_log_message)
        for op in _STATEMENT_METHODS:
            self.wrap(prepared_stmt.PreparedStatement, op, _statement_method(op))
        self.wrap(cursor.Cursor, "_init", _cursor_init)
        for name in ("fetch", "fetchrow", "forward"):
            self.wrap(cursor.Cursor, name, _cursor_method(name))
        self.wrap(cursor.CursorIterator, "__anext__", _cursor_method("__anext__"))
