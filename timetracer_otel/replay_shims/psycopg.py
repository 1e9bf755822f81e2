"""psycopg 3: cursor execution generators, recorded as raw PGresults, replayed through psycopg.

What it patches (all beneath the OTel instrumentation, which wraps ``connect`` and subclasses
the cursor): ``BaseCursor._execute_gen`` (``execute`` of every sync/async/client cursor),
``Cursor.executemany`` / ``AsyncCursor.executemany``, the server-side cursor's ``_declare_gen``
and ``_fetch_gen``, ``BaseConnection._connect_gen`` and, in replay only, ``_exec_command`` (the
BEGIN/COMMIT/SAVEPOINT psycopg issues itself) and the DNS step of ``connect``.

Record keeps each PGresult as the server sent it: status, column names/oids/modifiers/formats,
raw cell bytes, command status; plus the transaction status after the call and any change of
the session parameters the loaders read (TimeZone, DateStyle, IntervalStyle, client_encoding).
Replay hands those results to the cursor as objects with the PGresult interface, so psycopg's
own Transformer and loaders build the rows (a ``timestamptz`` gets the same ZoneInfo), and
builds errors with ``psycopg.errors.error_from_result`` (same class, sqlstate and diag).

In replay a connection wraps a never-connected libpq PGconn (its libpq side only serves
escaping) that reports the recorded session; any real I/O on it raises ReplayUnsupportedError,
and so do ``LISTEN`` and ``notifies()`` on it (no notification could ever arrive), each counted
in the replay's report (see :func:`~timetracer_otel.replay_shims.base.unsupported`).

A miss that ``on_miss`` lets go live (``passthrough``/``record``) on such a connection runs on
a real connection opened then, at the first such miss, from the connection parameters the app
gave (host, port, password...: the app's, not the cassette's); later misses reuse it, and
closing the app's connection closes it. The query runs there in a plain cursor of the same
kind (client-side binding, raw placeholders) with the app cursor's adapters; its PGresults are
handed to the app's cursor, whose own loaders build the rows, so values have their live types.
The real connection is a blocking one, for async connections too (the cursor generators it
runs in cannot await): an async app's miss blocks its event loop while it runs. It is set to
the DateStyle, IntervalStyle and TimeZone the replayed connection reports (the app's loaders
parse with those). Inside a transaction of the app's connection it begins one as the app's
began (the BEGIN psycopg sent, READ ONLY and isolation level included, or the app's own
replayed ``BEGIN ...``), ended by the app's commit()/rollback() (or a replayed
COMMIT/ROLLBACK); an error there puts the app's connection in the failed transaction state,
and a miss in a failed transaction raises InFailedSqlTransaction as the server would, without
going live. Other replayed session state (``SET``, savepoints, temporary tables) is not on
it. A server-side cursor's miss, or one whose connection cannot be opened, fails as before
("could not go live", :func:`~timetracer_otel.replay_shims.base.stranded`), and is not
recorded under on_miss="record".
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import itertools
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import psycopg
from opentelemetry.instrumentation.utils import suppress_instrumentation
from psycopg import adapt, pq
from psycopg import errors as pg_errors
from psycopg import sql as pg_sql
from psycopg._connection_base import BaseConnection
from psycopg._cursor_base import BaseCursor
from psycopg._server_cursor_base import ServerCursorMixin
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import _pq_ctypes
from psycopg.pq.misc import _clean_error_message
from psycopg.pq.pq_ctypes import PGconn

from timetracer_otel.codec import Tree, as_bytes
from timetracer_otel.config import Mode, OnMiss
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    _TAKEN,
    LIVE,
    STATE,
    Deferrable,
    Shim,
    capture,
    decide,
    rebuild_error,
    stranded,
    suppressed,
    unsupported,
)
from timetracer_otel.sql import begins_transaction, first_words, sql_call

log = logging.getLogger("timetracer_otel")
LIBRARY = "psycopg"
SCOPE = "opentelemetry.instrumentation.psycopg"

_ES = pq.ExecStatus
_TS = pq.TransactionStatus
# Session parameters the loaders read; a change (SET TimeZone...) is recorded with the call.
_LOADER_PARAMS = (b"TimeZone", b"DateStyle", b"IntervalStyle", b"client_encoding")
_REPORTED_PARAMS = (
    b"application_name", b"client_encoding", b"DateStyle", b"default_transaction_read_only",
    b"in_hot_standby", b"integer_datetimes", b"IntervalStyle", b"is_superuser",
    b"server_encoding", b"server_version", b"session_authorization",
    b"standard_conforming_strings", b"TimeZone",
)
# Used only when a replay opens more connections than were recorded.
_DEFAULT_SESSION: dict[str, Any] = {
    "params": {"client_encoding": "UTF8", "DateStyle": "ISO, MDY", "IntervalStyle": "postgres",
               "TimeZone": "UTC", "integer_datetimes": "on", "standard_conforming_strings": "on",
               "server_encoding": "UTF8", "server_version": "15.0"},
    "server_version": 150000,
    "backend_pid": 0,
}
# A unix socket directory that does not exist: libpq allocates a PGconn and fails at once.
_NOWHERE = "/nonexistent/timetracer-replay"


# --- the recorded PGresult -----------------------------------------------------------------


_STR_ONLY = frozenset({str})


def _text(raw: bytes | None, enc: str) -> Tree:
    """Text as text (reviewable JSON cassettes); bytes the encoding cannot decode as ``{"b": raw}``."""
    if raw is None:
        return None
    try:
        return raw.decode(enc)
    except UnicodeDecodeError:
        return {"b": raw}


def _text_row(row: list[bytes | None], binary: list[bool], enc: str) -> list[Tree]:
    if not any(binary):
        try:  # one comprehension per row; per-cell fallback only for undecodable bytes
            return [None if v is None else v.decode(enc) for v in row]
        except UnicodeDecodeError:
            pass
    return [v if v is None or binary[c] else _text(v, enc) for c, v in enumerate(row)]


def _raw(value: Tree, enc: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode(enc)
    return as_bytes(value["b"])


def _text_cell_reader() -> tuple[Any, Any] | None:
    # Text cells straight from libpq, one call each with the GIL held (PyDLL); psycopg's
    # get_value makes two calls per cell and releases the GIL around each.
    try:
        impl = vars(_pq_ctypes)  # private psycopg module, untyped
        lib = ctypes.PyDLL(impl["pq"]._name)
        getvalue, isnull = lib.PQgetvalue, lib.PQgetisnull
        getvalue.restype, isnull.restype = ctypes.c_char_p, ctypes.c_int
        getvalue.argtypes = isnull.argtypes = [impl["PGresult_ptr"], ctypes.c_int, ctypes.c_int]
    except Exception:
        return None
    return getvalue, isnull


_TEXT_CELLS = _text_cell_reader()


def _read_rows(res: Any, binary: list[bool]) -> list[list[bytes | None]]:
    nf, nt = len(binary), res.ntuples
    ptr = getattr(res, "_pgresult_ptr", None)
    if _TEXT_CELLS is None or ptr is None or any(binary):
        return [[res.get_value(r, c) for c in range(nf)] for r in range(nt)]
    getvalue, isnull = _TEXT_CELLS
    rows: list[list[bytes | None]] = []
    for r in range(nt):
        row: list[bytes | None] = [getvalue(ptr, r, c) for c in range(nf)]
        for c, v in enumerate(row):
            if not v and isnull(ptr, r, c):
                row[c] = None
        rows.append(row)
    return rows


class RecordedResult:
    """A recorded PGresult with the interface psycopg reads (``psycopg.pq.abc.PGresult``).

    Record copies each live result into one of these (and the cursor reads from it from then
    on, so the app sees exactly what the cassette holds); replay rebuilds it from the tree.
    """

    def __init__(self, status: int, command_status: bytes | None, command_tuples: int | None,
                 fields: list[tuple[bytes, int, int, int, int]], rows: list[list[bytes | None]],
                 error_message: bytes = b"", diag: dict[int, bytes] | None = None) -> None:
        self.status = status
        self.command_status = command_status
        self.command_tuples = command_tuples
        self._fields = fields
        self._rows = rows
        self.error_message = error_message
        self._diag = diag or {}
        self.ntuples = len(rows)
        self.nfields = len(fields)
        self.binary_tuples = fields[0][3] if fields else 0
        self.oid_value = 0
        self.nparams = 0

    @classmethod
    def capture(cls, res: Any) -> RecordedResult:
        """A copy of a live PGresult."""
        fields = [(res.fname(i) or b"", res.ftype(i), res.fmod(i), res.fformat(i), res.fsize(i))
                  for i in range(res.nfields)]
        rows = _read_rows(res, [f[3] == pq.Format.BINARY for f in fields])
        message, diag = b"", None
        if res.status == _ES.FATAL_ERROR:
            message = res.error_message
            diag = {int(f): v for f in pq.DiagnosticField if (v := res.error_field(f)) is not None}
        return cls(int(res.status), res.command_status, res.command_tuples, fields, rows,
                   message, diag)

    def parts(self) -> tuple[Any, ...]:
        """The copy as plain values (msgpack carries them), for :meth:`from_parts`."""
        return (self.status, self.command_status, self.command_tuples, self._fields, self._rows,
                self.error_message, list(self._diag.items()))

    @classmethod
    def from_parts(cls, parts: Any) -> RecordedResult:
        status, command_status, command_tuples, fields, rows, message, diag = parts
        return cls(status, command_status, command_tuples, fields, rows, message, dict(diag))

    def to_tree(self, enc: str) -> Tree:
        """Text cells, names and tags as text (reviewable JSON cassettes), binary cells as bytes."""
        binary = [f[3] == pq.Format.BINARY for f in self._fields]
        tree: dict[str, Any] = {
            "status": self.status,
            "cmd": _text(self.command_status, enc),
            "tuples": self.command_tuples,
            "fields": [[_text(f[0], enc), f[1], f[2], f[3], f[4]] for f in self._fields],
            "rows": [_text_row(row, binary, enc) for row in self._rows],
        }
        if self.status == _ES.FATAL_ERROR:
            tree["message"] = _text(self.error_message, enc)
            tree["diag"] = {str(k): _text(v, enc) for k, v in self._diag.items()}
        return tree

    @classmethod
    def from_tree(cls, tree: Tree, enc: str = "utf-8") -> RecordedResult:
        fields = [(_raw(f[0], enc) or b"", f[1], f[2], f[3], f[4]) for f in tree.get("fields", ())]
        binary = [f[3] == pq.Format.BINARY for f in fields]
        if any(binary):
            rows = [[None if v is None else as_bytes(v) if binary[c] else _raw(v, enc)
                     for c, v in enumerate(row)] for row in tree.get("rows", ())]
        else:  # text results, the usual case: str cells encoded inline, a call for the rest
            recorded = tree.get("rows", ())
            if _STR_ONLY.issuperset(map(type, itertools.chain.from_iterable(recorded))):
                # Every cell text (no NULL, no undecodable bytes): encoded in C, row by row.
                rows = [list(map(str.encode, row, itertools.repeat(enc))) for row in recorded]
            else:
                rows = [[v.encode(enc) if type(v) is str else _raw(v, enc) for v in row]
                        for row in recorded]
        diag = {int(k): _raw(v, enc) or b"" for k, v in (tree.get("diag") or {}).items()}
        return cls(tree["status"], _raw(tree.get("cmd"), enc), tree.get("tuples"), fields, rows,
                   _raw(tree.get("message"), enc) or b"", diag)

    def fname(self, i: int) -> bytes:
        return self._fields[i][0]

    def ftype(self, i: int) -> int:
        return self._fields[i][1]

    def fmod(self, i: int) -> int:
        return self._fields[i][2]

    def fformat(self, i: int) -> int:
        return self._fields[i][3]

    def fsize(self, i: int) -> int:
        return self._fields[i][4]

    def ftable(self, i: int) -> int:
        return 0

    def ftablecol(self, i: int) -> int:
        return 0

    def param_type(self, i: int) -> int:
        return 0

    def get_value(self, row: int, col: int) -> bytes | None:
        return self._rows[row][col]

    def error_field(self, code: int) -> bytes | None:
        return self._diag.get(int(code))

    def get_error_message(self, encoding: str = "utf-8") -> str:
        return _clean_error_message(self.error_message, encoding)

    def clear(self) -> None:
        pass

    def set_attributes(self, descriptions: list[Any]) -> None:
        raise unsupported("A recorded psycopg result is read-only.",
                          "psycopg set_attributes on a recorded result")

    def __repr__(self) -> str:
        return f"<RecordedResult {_ES(self.status).name} {self.ntuples} rows>"


def _refused(what: str) -> ReplayUnsupportedError:
    """The error for an operation a replayed connection cannot do, counted in the report."""
    return unsupported(
        f"psycopg {what} is not supported on a replayed connection (COPY, stream(), "
        "pipeline mode, LISTEN/notifies() and cancel need the server); keep psycopg live with "
        "TIMETRACER_LIVE_PLUGINS=psycopg for this code.",
        f"psycopg {what}",
    )


def _simple_result(command: str) -> RecordedResult:
    word = command.split(None, 1)[0].upper().encode() if command.strip() else b""
    return RecordedResult(int(_ES.COMMAND_OK), word, None, [], [])


# --- the replay connection -----------------------------------------------------------------


class ReplayPGconn(PGconn):
    """A libpq PGconn that never connected, reporting the recorded session.

    Status, transaction status and parameter statuses come from the cassette; escaping uses
    the libpq object; sending anything to a server raises :class:`ReplayUnsupportedError`.
    """

    def __init__(self, params: dict[str, Any], session: Tree) -> None:
        nowhere = {k: v for k, v in params.items() if k not in ("host", "hostaddr", "port")}
        ptr = _pq_ctypes.PQconnectStart(make_conninfo("", **nowhere, host=_NOWHERE).encode())
        if not ptr:
            raise MemoryError("couldn't allocate PGconn")
        super().__init__(ptr)
        self._conninfo = params
        self._params = {k.encode(): v.encode() for k, v in session["params"].items()}
        self._server_version: int = session["server_version"]
        self._backend_pid: int = session.get("backend_pid") or 0
        self._tx_status: int = _TS.IDLE
        self._nonblocking = 1
        self._open = True
        # The real connection a miss goes live on (see _live_connection), and why it could not
        # be opened.
        self._live: psycopg.Connection[Any] | None = None
        self._live_error: BaseException | None = None
        # The command that began the app's current transaction (BEGIN READ ONLY...), for the
        # real connection to begin its own the same way.
        self._begin: str | None = None

    # What the connection reports.
    # Plain ints, as libpq's PGconn gives them (psycopg's ConnectionInfo makes the enums).
    @property
    def status(self) -> int:
        return int(pq.ConnStatus.OK if self._open else pq.ConnStatus.BAD)

    @property
    def transaction_status(self) -> int:
        return int(self._tx_status if self._open else _TS.UNKNOWN)

    def parameter_status(self, name: bytes) -> bytes | None:
        return self._params.get(name)

    @property
    def server_version(self) -> int:
        return self._server_version

    @property
    def backend_pid(self) -> int:
        return self._backend_pid

    @property
    def protocol_version(self) -> int:
        return 3

    @property
    def full_protocol_version(self) -> int:
        if pq.version() < 180000:  # NotSupportedError, as live with this libpq
            return super().full_protocol_version
        return 30000

    @property
    def used_gssapi(self) -> bool:
        if pq.version() < 160000:  # NotSupportedError, as live with this libpq
            return super().used_gssapi
        return False

    @property
    def nonblocking(self) -> int:
        return self._nonblocking  # 1, as psycopg's connect leaves a live one

    @nonblocking.setter
    def nonblocking(self, arg: int) -> None:
        self._nonblocking = int(arg)

    @property
    def ssl_in_use(self) -> bool:
        return False

    @property
    def error_message(self) -> bytes:
        return b""

    @property
    def socket(self) -> int:
        # Read eagerly by Connection.wait; replayed generators never wait on it.
        return -1

    def _conn_bytes(self, key: str, default: str = "") -> bytes:
        value = self._conninfo.get(key)
        return str(value if value is not None else default).encode()

    @property
    def host(self) -> bytes:
        return self._conninfo_host()

    def _conninfo_host(self) -> bytes:
        return self._conn_bytes("host", os.environ.get("PGHOST", "/var/run/postgresql"))

    @property
    def hostaddr(self) -> bytes:
        return self._conn_bytes("hostaddr")

    @property
    def port(self) -> bytes:
        return self._conn_bytes("port", os.environ.get("PGPORT", "5432"))

    def finish(self, *args: Any) -> None:
        self._open = False
        live, self._live = self._live, None
        if live is not None:
            live.close()
        super().finish()

    def apply(self, tx: int | None, session: dict[str, str] | None) -> None:
        if tx is not None:
            self._tx_status = tx
            if tx == _TS.UNKNOWN:  # (libpq's answer for a connection that is gone)
                self._open = False  # closed and broken, as psycopg then reports it live
        for k, v in (session or {}).items():
            self._params[k.encode()] = v.encode()

    def simulate(self, command: str) -> RecordedResult:
        """The transaction bookkeeping of a command psycopg sends itself (BEGIN, COMMIT...)."""
        words = command.split(None, 2)
        first = words[0].upper() if words else ""
        second = words[1].upper() if len(words) > 1 else ""
        if begins_transaction(command):
            self._tx_status = _TS.INTRANS
            self._begin = command
        elif first == "ROLLBACK" and second == "TO":
            self._tx_status = _TS.INTRANS
        elif first in ("COMMIT", "ROLLBACK", "END", "ABORT"):
            self._tx_status = _TS.IDLE
            self._begin = None
            self.follow(first in ("ROLLBACK", "ABORT"))
        return _simple_result(command)

    def follow(self, rollback: bool) -> None:
        """The app's transaction ended: end the one the real connection mirrors."""
        live = self._live
        if live is None or self._tx_status != _TS.IDLE or live.closed \
                or live.info.transaction_status == _TS.IDLE:
            return
        with suppress_instrumentation():
            live.execute("ROLLBACK" if rollback else "COMMIT")

    def _unsupported(self, what: str) -> ReplayUnsupportedError:
        return _refused(what)

    def send_query(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_query")

    def send_query_params(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_query_params")

    def send_prepare(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_prepare")

    def send_query_prepared(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_query_prepared")

    def send_describe_portal(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_describe_portal")

    def send_close_prepared(self, *args: Any, **kwargs: Any) -> None:
        raise self._unsupported("send_close_prepared")

    def enter_pipeline_mode(self) -> None:
        raise self._unsupported("pipeline mode")

    def get_cancel(self) -> Any:
        raise self._unsupported("cancel")

    def cancel_conn(self) -> Any:
        raise self._unsupported("cancel")


def _session_tree(pgconn: Any) -> Tree:
    params = {}
    for name in _REPORTED_PARAMS:
        value = pgconn.parameter_status(name)
        if value is not None:
            params[name.decode()] = value.decode("utf-8", "replace")
    return {"params": params, "server_version": pgconn.server_version,
            "backend_pid": pgconn.backend_pid}


# Last loader parameters seen per live connection, to record only their changes.
_seen: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
# Sessions of replayed connections, reused when a replay opens more connections than recorded.
_last_session: dict[str | None, Tree] = {}


@functools.lru_cache(maxsize=1024)
def _sets_parameters(statement: str | bytes) -> bool:
    """Whether a statement may change what the server reports beyond the loaders' parameters
    (``SET application_name``, ``RESET ALL``...): every reported parameter is then compared
    after it, not only the four the loaders read."""
    if isinstance(statement, bytes):
        statement = statement.decode("utf-8", "replace")
    return any(word in ("SET", "RESET") for word in first_words(statement))


def _session_change(pgconn: Any, full: bool = False) -> dict[str, str] | None:
    """The reported parameters that changed since the last call on ``pgconn``: the loaders'
    four, or (``full``) every reported one."""
    now = {}
    for name in _REPORTED_PARAMS if full else _LOADER_PARAMS:
        value = pgconn.parameter_status(name)
        if value is not None:
            now[name.decode()] = value.decode("utf-8", "replace")
    before = _seen.get(pgconn)
    _seen[pgconn] = now
    if before is None or before == now:
        return None
    return {k: v for k, v in now.items() if before.get(k) != v}


# --- keys ------------------------------------------------------------------------------------


def _statement(query: Any) -> str | bytes:
    if isinstance(query, str | bytes):
        return query
    if isinstance(query, pg_sql.Composable):
        try:
            return query.as_string(None)  # no connection: the same text in record and replay
        except Exception:
            return repr(query)
    return str(query)


def _plain(value: Any) -> Any:
    """Parameters as values the codec knows (psycopg's Json and Range wrappers unwrapped)."""
    t = type(value)
    if t is list or t is tuple:
        return t(_plain(v) for v in value)
    if t is dict:
        return {k: _plain(v) for k, v in value.items()}
    if t.__module__.startswith("psycopg"):
        if hasattr(value, "obj") and hasattr(value, "dumps"):  # Json / Jsonb
            return {"json": t.__name__, "obj": _plain(value.obj)}
        if hasattr(value, "lower") and hasattr(value, "bounds"):  # Range
            return {"range": (_plain(value.lower), _plain(value.upper), value.bounds)}
        return repr(value)
    return value


def _dbname(conn: Any) -> str | None:
    try:
        db = conn.pgconn.db
    except Exception:
        return None
    return db.decode("utf-8", "replace") if isinstance(db, bytes) else None


def _call(cur: Any, query: Any, params: Any, operation: str,
          extra: dict[str, Any] | None = None) -> Call:
    return sql_call(LIBRARY, _statement(query), _plain(params) if params is not None else None,
                    database=_dbname(cur._conn), operation=operation, extra=extra)


def _connect_call(params: dict[str, Any]) -> Call:
    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    db = params.get("dbname") or os.environ.get("PGDATABASE") or user
    return sql_call(LIBRARY, "connect", None, database=str(db), operation="connect",
                    extra={"user": str(user)})


# --- record and replay of one cursor call ------------------------------------------------------


def _cursor_outcome(cur: Any, results: list[Any] | None = None, *, swap: bool = False,
                    full: bool = False) -> Any:
    """The cursor's outcome, read from it (its results copied; with ``swap`` the cursor then
    reads the copies), as plain values: what the request path keeps of a cursor call, whose
    tree :func:`_outcome_tree` makes, in the writer for a call left to it."""
    copies = [RecordedResult.capture(r) for r in (cur._results if results is None else results)]
    if swap and copies:
        rowcount, status = cur._rowcount, cur._statusmessage
        cur._results = copies
        cur._select_current_result(cur._iresult)
        cur._rowcount, cur._statusmessage = rowcount, status
    pgconn = cur._conn.pgconn
    return (cur._encoding, [c.parts() for c in copies], cur._rowcount, cur._statusmessage,
            int(pgconn.transaction_status), _session_change(pgconn, full))


def _outcome_tree(outcome: Any) -> Tree:
    enc, results, rowcount, status, tx, change = outcome
    tree: dict[str, Any] = {
        "results": [RecordedResult.from_parts(r).to_tree(enc) for r in results],
        "rowcount": rowcount,
        "status": _text(status, enc),
        "tx": tx,
    }
    if change:
        tree["session"] = change
    return tree


# Cursor calls, recorded as their outcomes (see base.Deferrable): left to the writer where
# they can be, the tree made there.
_recording = Deferrable(LIBRARY, SCOPE, _outcome_tree)


def _error_attrs(cur: Any, exc: BaseException) -> Tree:
    res = exc.pgresult if isinstance(exc, psycopg.Error) else None
    try:
        tx = int(cur._conn.pgconn.transaction_status)
    except Exception:
        tx = None
    result = RecordedResult.capture(res).to_tree(cur._encoding) if res is not None else None
    # What the cursor holds as the error leaves it: an executemany failing part-way has
    # counted the rows of the statements that ran.
    return {"result": result, "tx": tx, "rowcount": cur._rowcount,
            "status": _text(cur._statusmessage, cur._encoding)}


def _apply_session(cur: Any, tx: int | None, session: dict[str, str] | None) -> None:
    pgconn = cur._conn.pgconn
    if isinstance(pgconn, ReplayPGconn):
        pgconn.apply(tx, session)


def _live_connection(cur: Any, call: Call) -> psycopg.Connection[Any]:
    """The real connection a miss on a connection the replay opened goes live on, opened at
    its first such miss with the app's connection parameters; :func:`stranded` when it cannot
    be opened. Inside a transaction of the app's connection, it is in one too."""
    pgconn: ReplayPGconn = cur._conn.pgconn
    live = pgconn._live
    if live is None:
        if pgconn._live_error is not None:
            raise stranded(call) from pgconn._live_error
        try:
            with suppress_instrumentation():  # timetracer's and OTel's: not the app's own calls
                live = psycopg.Connection.connect(make_conninfo("", **pgconn._conninfo),
                                                  autocommit=True)
        except Exception as exc:
            pgconn._live_error = exc
            raise stranded(call) from exc
        pgconn._live = live
        log.info("psycopg: %s had no recording; opened a real connection for it (replayed "
                 "session state such as SET is not on it)", call.label)
    _sync_session(pgconn, live)
    if pgconn._tx_status != _TS.IDLE and live.info.transaction_status == _TS.IDLE:
        # Begun as the app's was (READ ONLY, its isolation level...): a miss in a read-only
        # transaction must not write to the real database.
        begin = pgconn._begin or cur._conn._get_tx_start_command().decode()
        with suppress_instrumentation():
            live.execute(begin.encode())
    return live


# Session parameters the app's loaders read from its (replayed) connection to parse values:
# the real connection reports them the same, or dates, intervals and timestamps come back in
# a form those loaders do not read (DateStyle=SQL,MDY...) or in another time zone.
_PARSE_PARAMS = (b"DateStyle", b"IntervalStyle", b"TimeZone")


def _sync_session(pgconn: ReplayPGconn, live: psycopg.Connection[Any]) -> None:
    """Set on the real connection the parsing parameters the replayed one reports."""
    if live.info.transaction_status == _TS.INERROR:
        return
    for name in _PARSE_PARAMS:
        want = pgconn.parameter_status(name)
        if want is None or live.pgconn.parameter_status(name) == want:
            continue
        with suppress_instrumentation():
            live.execute("SELECT pg_catalog.set_config(%s, %s, false)",
                         (name.decode(), want.decode()))


def _live_cursor(cur: Any, live: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """A cursor on the real connection that sends what ``cur`` would: same placeholders and
    binding, same adapters, same format."""
    cls: type[psycopg.Cursor[Any]]
    if isinstance(cur, psycopg.RawCursor | psycopg.AsyncRawCursor):
        cls = psycopg.RawCursor
    elif isinstance(cur, psycopg.ClientCursor | psycopg.AsyncClientCursor):
        cls = psycopg.ClientCursor
    else:
        cls = psycopg.Cursor
    lcur = cls(live)
    lcur._adapters = adapt.AdaptersMap(cur.adapters)
    lcur.format = cur.format
    return lcur


def _run_live(cur: Any, live: psycopg.Connection[Any],
              run: Callable[[psycopg.Cursor[Any]], Any]) -> None:
    """A miss on a connection the replay opened, run on the real one behind it (``live``, from
    :func:`_live_connection`); its results put on ``cur`` as psycopg's execute would."""
    lcur = _live_cursor(cur, live)
    try:
        with suppress_instrumentation():  # not the app's own call: no span, no replay
            run(lcur)
    except Exception:
        cur._rowcount, cur._statusmessage = lcur._rowcount, lcur._statusmessage
        raise
    finally:
        if live.info.transaction_status == _TS.INERROR:
            _apply_session(cur, _TS.INERROR, None)
    results: list[Any] = [RecordedResult.capture(r) for r in lcur._results]
    rowcount, status = lcur._rowcount, lcur._statusmessage
    cur._results = results
    if results:
        cur._select_current_result(0)
    cur._rowcount, cur._statusmessage = rowcount, status
    lcur.close()


def _went_live(cur: Any, call: Call, run: Callable[[psycopg.Cursor[Any]], Any],
               record: bool) -> None:
    """:func:`_run_live`, and recorded as a live call is when ``record`` (on_miss="record").
    The real connection is opened first: a miss that could not go live is no answer of the
    database, so nothing of it is recorded (as asyncpg's ``_run``). In a failed transaction
    of the app's connection the server would refuse it: it fails so, as live, without one."""
    failed = _in_failed_transaction(cur, call)
    live = None if failed is not None else _live_connection(cur, call)

    def go() -> None:
        if live is None:
            assert failed is not None
            raise failed
        _run_live(cur, live, run)

    if not record:
        go()
        return
    with _recording(call) as cap:
        try:
            go()
        except Exception as exc:
            cap.fail(exc, _error_attrs(cur, exc))
            raise
        cap.ok(_cursor_outcome(cur))


def _note_begin(cur: Any, call: Call) -> None:
    """A replayed statement that began a transaction (``BEGIN READ ONLY``): kept, for a miss
    going live in it to begin the real connection's transaction the same way."""
    pgconn = cur._conn.pgconn
    statement = call.identity.get("statement") if isinstance(call.identity, dict) else None
    if not isinstance(pgconn, ReplayPGconn):
        return
    if pgconn._tx_status == _TS.IDLE:
        pgconn._begin = None
    elif isinstance(statement, str) and begins_transaction(statement):
        pgconn._begin = statement


# What the server answers a statement in a failed transaction (psycopg's InFailedSqlTransaction).
_IN_FAILED = b"current transaction is aborted, commands ignored until end of transaction block"
_ENDS_FAILED = ("ROLLBACK", "ABORT", "COMMIT", "END", "PREPARE TRANSACTION")


def _in_failed_transaction(cur: Any, call: Call) -> psycopg.Error | None:
    """The error psycopg raises for ``call`` when the app's connection is in a failed
    transaction (INERROR) and ``call`` would not end it; None otherwise."""
    pgconn = cur._conn.pgconn
    if not isinstance(pgconn, ReplayPGconn) or pgconn._tx_status != _TS.INERROR:
        return None
    statement = call.identity.get("statement") if isinstance(call.identity, dict) else None
    if isinstance(statement, str) and statement.lstrip().upper().startswith(_ENDS_FAILED):
        return None
    F = pq.DiagnosticField
    diag = {int(F.SEVERITY): b"ERROR", int(F.SEVERITY_NONLOCALIZED): b"ERROR",
            int(F.SQLSTATE): b"25P02", int(F.MESSAGE_PRIMARY): _IN_FAILED}
    result = RecordedResult(int(_ES.FATAL_ERROR), b"", None, [], [],
                            b"ERROR:  " + _IN_FAILED + b"\n", diag)
    return pg_errors.error_from_result(result, encoding=cur._encoding)


def _replayed_conn(cur: Any) -> bool:
    return isinstance(cur._conn.pgconn, ReplayPGconn)


def _listens(query: Any) -> bool:
    """Whether the query subscribes to notifications (``LISTEN``), which a replayed connection
    would never deliver: refused rather than answered with a silent nothing. Only a LISTEN
    statement: not the word in a string, a comment or an identifier. Read from the query as
    the app gave it (the call's statement has its comments removed, and line ends with them).
    Per text once: a replayed connection asks it of every statement."""
    return _listens_text(_statement(query))


@functools.lru_cache(maxsize=4096)
def _listens_text(statement: str | bytes) -> bool:
    if isinstance(statement, bytes):
        statement = statement.decode("utf-8", "replace")
    if "listen" not in statement.lower():
        return False
    return "LISTEN" in first_words(statement)


def _needs_server(cur: Any, call: Call) -> None:
    """A miss about to go live (on_miss passthrough/record) on a connection the replay
    opened from the cassette: there is no server to send it to."""
    if isinstance(cur._conn.pgconn, ReplayPGconn):
        raise stranded(call)


def _raise_recorded(cur: Any, match: Match) -> None:
    attrs = match.span.error.get("attrs") or {}
    if "rowcount" in attrs:  # (cassettes recorded before 2026-11-29 have neither)
        cur._rowcount = attrs["rowcount"]
        cur._statusmessage = _raw(attrs.get("status"), cur._encoding)
    raise _recorded_error(cur._conn.pgconn, match.span.error, cur._encoding)


def _recorded_error(pgconn: Any, err: Tree, encoding: str) -> BaseException:
    """A recorded error as psycopg raised it (from the server's result: same class, sqlstate
    and diag), the connection left in the transaction status it had then."""
    attrs = err.get("attrs") or {}
    if isinstance(pgconn, ReplayPGconn):
        pgconn.apply(attrs.get("tx"), None)
    if attrs.get("result") is not None:
        return pg_errors.error_from_result(RecordedResult.from_tree(attrs["result"], encoding),
                                           encoding=encoding)
    return rebuild_error(err)


def _apply(cur: Any, match: Match) -> None:
    """Put the recorded outcome on the cursor, as psycopg's own execute would have."""
    if match.span.error is not None:
        _raise_recorded(cur, match)
    rec = match.span.response
    _apply_session(cur, rec.get("tx"), rec.get("session"))
    pgconn = cur._conn.pgconn
    if isinstance(pgconn, ReplayPGconn) and pgconn._live is not None:
        pgconn.follow(str(rec.get("status") or "").upper().startswith(("ROLLBACK", "ABORT")))
    results: list[Any] = [RecordedResult.from_tree(t, cur._encoding) for t in rec["results"]]
    cur._results = results
    if results:
        cur._select_current_result(0)
    cur._rowcount = rec["rowcount"]
    cur._statusmessage = _raw(rec["status"], cur._encoding)


# --- the patched methods ------------------------------------------------------------------------


def _execute_gen(original: Any) -> Any:
    def _execute_gen(self: Any, query: Any, params: Any = None, *, prepare: bool | None = None,
                     binary: bool | None = None) -> Any:
        if STATE.mode is Mode.OFF or self._conn._pipeline:
            return (yield from original(self, query, params, prepare=prepare, binary=binary))
        call = _call(self, query, params, "execute")
        if _replayed_conn(self) and _listens(query):
            raise _refused("LISTEN")
        action = decide(call)
        if isinstance(action, Match):
            yield from self._start_query(query)
            _apply(self, action)
            self._last_query = query
            _note_begin(self, call)
            return None
        if _replayed_conn(self):  # a miss going live: on the real connection behind it
            yield from self._start_query(query)

            def run(lcur: psycopg.Cursor[Any]) -> None:
                lcur.execute(query, params, prepare=prepare, binary=binary)

            _went_live(self, call, run, record=action is not LIVE)
            self._last_query = query
            return None

        if action is LIVE:
            return (yield from original(self, query, params, prepare=prepare, binary=binary))
        with _recording(call) as cap:
            try:
                yield from original(self, query, params, prepare=prepare, binary=binary)
            except Exception as exc:
                cap.fail(exc, _error_attrs(self, exc))
                raise
            cap.ok(_cursor_outcome(self, swap=True, full=_sets_parameters(_statement(query))))
        return None

    return _execute_gen


def _replay_many_gen(cur: Any, query: Any, returning: bool, match: Match) -> Any:
    yield from cur._start_query(query)
    cur._execmany_returning = returning
    _apply(cur, match)
    cur._last_query = query


def _live_many_gen(cur: Any, query: Any, params_seq: list[Any], returning: bool, call: Call,
                   record: bool) -> Any:
    """executemany missing on a connection the replay opened: run on the real one."""
    yield from cur._start_query(query)
    cur._execmany_returning = returning
    if not returning:
        cur._rowcount = 0  # as psycopg's executemany, before its first statement

    def run(lcur: psycopg.Cursor[Any]) -> None:
        lcur.executemany(query, params_seq, returning=returning)

    _went_live(cur, call, run, record)
    cur._last_query = query


def _many_call(cur: Any, query: Any, params_seq: list[Any], returning: bool) -> Call:
    return _call(cur, query, params_seq, "executemany", {"returning": returning})


def _executemany(original: Any) -> Any:
    def executemany(self: Any, query: Any, params_seq: Iterable[Any], *,
                    returning: bool = False) -> None:
        if STATE.mode is Mode.OFF or self._conn._pipeline:
            return original(self, query, params_seq, returning=returning)  # type: ignore[no-any-return]
        params_seq = list(params_seq)
        call = _many_call(self, query, params_seq, returning)
        action = decide(call)
        if isinstance(action, Match):
            with self._conn.lock:
                self._conn.wait(_replay_many_gen(self, query, returning, action))
            return None
        if _replayed_conn(self):
            with self._conn.lock:
                self._conn.wait(_live_many_gen(self, query, params_seq, returning, call,
                                               action is not LIVE))
            return None

        if action is LIVE:
            return original(self, query, params_seq, returning=returning)  # type: ignore[no-any-return]
        with _recording(call) as cap:
            try:
                original(self, query, params_seq, returning=returning)
            except Exception as exc:
                cap.fail(exc, _error_attrs(self, exc))
                raise
            cap.ok(_cursor_outcome(self, swap=True))
        return None

    return executemany


def _aexecutemany(original: Any) -> Any:
    async def executemany(self: Any, query: Any, params_seq: Iterable[Any], *,
                          returning: bool = False) -> None:
        if STATE.mode is Mode.OFF or self._conn._pipeline:
            return await original(self, query, params_seq, returning=returning)  # type: ignore[no-any-return]
        params_seq = list(params_seq)
        call = _many_call(self, query, params_seq, returning)
        action = decide(call)
        if isinstance(action, Match):
            async with self._conn.lock:
                await self._conn.wait(_replay_many_gen(self, query, returning, action))
            return None
        if _replayed_conn(self):
            async with self._conn.lock:
                await self._conn.wait(_live_many_gen(self, query, params_seq, returning, call,
                                                     action is not LIVE))
            return None

        if action is LIVE:
            return await original(self, query, params_seq, returning=returning)  # type: ignore[no-any-return]
        with _recording(call) as cap:
            try:
                await original(self, query, params_seq, returning=returning)
            except Exception as exc:
                cap.fail(exc, _error_attrs(self, exc))
                raise
            cap.ok(_cursor_outcome(self, swap=True))
        return None

    return executemany


# Server-side cursors: the declared query (and its parameters) keys each later FETCH, since
# cursor names may be random (SQLAlchemy's are).
_declared: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _declare_gen(original: Any) -> Any:
    def _declare_gen(self: Any, query: Any, params: Any = None,
                     binary: bool | None = None) -> Any:
        if STATE.mode is Mode.OFF:
            return (yield from original(self, query, params, binary))
        _declared[self] = (query, params)
        call = _call(self, query, params, "declare")
        action = decide(call)
        if isinstance(action, Match):
            if self._described:
                yield from self._close_gen()
                self._described = False
            self._iter_rows = None
            yield from self._start_query(query)
            if binary is None:
                self._format = self.format
            else:
                self._format = pq.Format.BINARY if binary else pq.Format.TEXT
            if action.span.error is not None:
                _raise_recorded(self, action)
            rec = action.span.response
            _apply_session(self, rec.get("tx"), rec.get("session"))
            self._results = [RecordedResult.from_tree(t, self._encoding) for t in rec["results"]]
            self._select_current_result(0, format=self._format)
            self._described = True
            return None
        _needs_server(self, call)

        if action is LIVE:
            return (yield from original(self, query, params, binary))
        with _recording(call) as cap:
            inside = _IN_CALL.set(True)
            try:
                yield from original(self, query, params, binary)
            except Exception as exc:
                cap.fail(exc, _error_attrs(self, exc))
                raise
            finally:
                _IN_CALL.reset(inside)
            cap.ok(_cursor_outcome(self))
        return None

    return _declare_gen


def _fetch_gen(original: Any) -> Any:
    def _fetch_gen(self: Any, num: int | None) -> Any:
        if STATE.mode is Mode.OFF or self.closed:
            return (yield from original(self, num))
        query, params = _declared.get(self, (f"<cursor {self._name}>", None))
        call = _call(self, query, params, "fetch", {"rows": num})
        action = decide(call)
        if isinstance(action, Match):
            if action.span.error is not None:
                _raise_recorded(self, action)
            rec = action.span.response
            _apply_session(self, rec.get("tx"), rec.get("session"))
            res = RecordedResult.from_tree(rec["results"][0], self._encoding)
            self.pgresult = res
            self._tx.set_pgresult(res, set_loaders=False)
            return self._tx.load_rows(0, res.ntuples, self._make_row)
        _needs_server(self, call)

        if action is LIVE:
            return (yield from original(self, num))
        with _recording(call) as cap:
            inside = _IN_CALL.set(True)
            try:
                rows = yield from original(self, num)
            except Exception as exc:
                cap.fail(exc, _error_attrs(self, exc))
                raise
            finally:
                _IN_CALL.reset(inside)
            cap.ok(_cursor_outcome(self, [self.pgresult]))
        return rows

    return _fetch_gen


# Set while a server-side cursor's call is recorded on a span of its own (the instrumentation
# has none for them, so no span is claimed): the commands it sends are the call's.
_IN_CALL: ContextVar[bool] = ContextVar("timetracer_psycopg_in_call", default=False)


def _command_call(conn: Any, command: Any) -> tuple[str, Call]:
    text = _statement(command)
    text = text.decode() if isinstance(text, bytes) else text
    return text, sql_call(LIBRARY, text, None, database=_dbname(conn), operation="command")


def _exec_command(original: Any) -> Any:
    """The commands psycopg sends itself (BEGIN, COMMIT, ROLLBACK, SAVEPOINT...: commit(),
    rollback(), ``transaction()``). Recorded as calls of their own: the transaction status
    each leaves, and the error it raised (a COMMIT refused by a deferred constraint or a
    serialization failure, a SAVEPOINT in a failed transaction); not one sent inside a
    statement's own call (the BEGIN psycopg sends before it). In replay a recorded one
    gives that outcome again, in recorded order; one not recorded (cassettes made before
    they were) succeeds, its transaction bookkeeping simulated as before."""

    def _exec_command(self: Any, command: Any, result_format: Any = pq.Format.TEXT) -> Any:
        pgconn = self.pgconn
        if isinstance(pgconn, ReplayPGconn) and pgconn._open and not self._pipeline:
            text, call = _command_call(self, command)
            index = STATE.index
            match = index.take(call) if STATE.mode is Mode.REPLAY and index is not None else None
            if match is not None and match.span.error is not None:
                raise _recorded_error(pgconn, match.span.error, pgconn._encoding)
            result = pgconn.simulate(text)
            answer = match.span.response if match is not None else None
            if isinstance(answer, dict):
                pgconn.apply(answer.get("tx"), answer.get("session"))
            return result
            yield  # a generator, like the original
        if STATE.mode is not Mode.RECORD or self._pipeline or _TAKEN.get() is not None \
                or _IN_CALL.get():
            # (inside a call being recorded: the BEGIN before a statement is that statement's,
            # a named cursor's DECLARE and FETCH are its calls'; a span of its own there would
            # make a lone statement a trace of two spans)
            return (yield from original(self, command, result_format))
        text, call = _command_call(self, command)
        if decide(call) is LIVE:  # (suppressed: not the app's own)
            return (yield from original(self, command, result_format))
        with capture(call, SCOPE) as cap:
            try:
                result = yield from original(self, command, result_format)
            except Exception as exc:
                res = exc.pgresult if isinstance(exc, psycopg.Error) else None
                cap.fail(exc, {
                    "result": RecordedResult.capture(res).to_tree(pgconn._encoding)
                    if res is not None else None,
                    "tx": int(pgconn.transaction_status)})
                raise
            done: dict[str, Any] = {"tx": int(pgconn.transaction_status)}
            change = _session_change(pgconn, full=True)  # (a ROLLBACK undoes a SET)
            if change:
                done["session"] = change
            cap.ok(done)
        return result

    return _exec_command


def _escaped_bytea(original: Any) -> Any:
    """``Escaping.escape_bytea`` on a replayed connection: as the recorded server's session
    makes libpq escape (hex, with ``standard_conforming_strings`` as it was), not as a
    connection that never reached a server does (the old escape format, backslashes doubled),
    so a statement the app builds client-side (``ClientCursor``, ``sql.Literal(bytes)``) is
    the recorded one."""
    def escape_bytea(self: Any, data: Any) -> bytes:
        conn = self.conn
        if isinstance(conn, ReplayPGconn) and conn.server_version >= 90000:
            prefix = b"\\x" if conn.parameter_status(b"standard_conforming_strings") == b"on" \
                else b"\\\\x"
            return prefix + bytes(data).hex().encode()
        return original(self, data)  # type: ignore[no-any-return]

    return escape_bytea


def _escaped_string(original: Any) -> Any:
    """``Escaping.escape_string`` on a replayed connection: quotes doubled, and backslashes
    too only where the recorded session had ``standard_conforming_strings`` off."""
    def escape_string(self: Any, data: Any) -> bytes:
        conn = self.conn
        if isinstance(conn, ReplayPGconn):
            out = bytes(data).replace(b"'", b"''")
            if conn.parameter_status(b"standard_conforming_strings") != b"on":
                out = out.replace(b"\\", b"\\\\")
            return out
        return original(self, data)  # type: ignore[no-any-return]

    return escape_string


def _notifies(original: Any) -> Any:
    # Notifications come from the server's socket: a replayed connection has none.
    def notifies(self: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.pgconn, ReplayPGconn):
            raise _refused("notifies()")
        return original(self, *args, **kwargs)

    return notifies


def _connect_gen(original: Any) -> Any:
    func = original.__func__

    def _connect_gen(cls: Any, conninfo: str = "") -> Any:
        if STATE.mode is Mode.OFF or (STATE.mode is Mode.REPLAY and suppressed()):
            return (yield from func(cls, conninfo))
        params = conninfo_to_dict(conninfo)
        call = _connect_call(params)
        db = call.identity["db"]
        if STATE.mode is Mode.REPLAY:
            on_miss, live = STATE.policy()
            if STATE.is_live(LIBRARY, live):
                return (yield from func(cls, conninfo))
            match = STATE.index.take(call) if STATE.index is not None else None
            # With no recorded connect, a replay still connects (fewer or more pool
            # connections than recorded are fine) unless misses may go live.
            if match is not None or on_miss is OnMiss.ERROR:
                if match is not None and match.span.error is not None:
                    raise rebuild_error(match.span.error)
                session = match.span.response if match is not None else None
                session = session or _last_session.get(db) or _DEFAULT_SESSION
                _last_session[db] = session
                return cls(ReplayPGconn(params, session))
            if on_miss is OnMiss.PASSTHROUGH:
                return (yield from func(cls, conninfo))
        with capture(call, SCOPE) as cap:
            try:
                conn = yield from func(cls, conninfo)
            except Exception as exc:
                cap.fail(exc)
                raise
            cap.ok(_session_tree(conn.pgconn))
            _session_change(conn.pgconn)
        return conn

    return classmethod(_connect_gen)


def _no_dns(original: Any) -> Any:
    # A replay resolves no host names: the recorded server is not there to be found.
    def conninfo_attempts(params: Any) -> Any:
        if STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY) and not suppressed():
            return [dict(params)]
        return original(params)

    return conninfo_attempts


def _no_dns_async(original: Any) -> Any:
    async def conninfo_attempts_async(params: Any) -> Any:
        if STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY) and not suppressed():
            return [dict(params)]
        return await original(params)

    return conninfo_attempts_async


class PsycopgShim(Shim):
    library = LIBRARY
    requires = "psycopg"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.psycopg:PsycopgInstrumentor"

    def patch(self) -> None:
        from psycopg import connection, connection_async

        self.wrap(BaseCursor, "_execute_gen", _execute_gen)
        self.wrap(psycopg.Cursor, "executemany", _executemany)
        self.wrap(psycopg.AsyncCursor, "executemany", _aexecutemany)
        self.wrap(ServerCursorMixin, "_declare_gen", _declare_gen)
        self.wrap(ServerCursorMixin, "_fetch_gen", _fetch_gen)
        self.wrap(BaseConnection, "_exec_command", _exec_command)
        from psycopg.pq import pq_ctypes

        self.wrap(pq_ctypes.Escaping, "escape_bytea", _escaped_bytea)
        self.wrap(pq_ctypes.Escaping, "escape_string", _escaped_string)
        self.wrap(BaseConnection, "_connect_gen", _connect_gen)
        self.wrap(psycopg.Connection, "notifies", _notifies)
        self.wrap(psycopg.AsyncConnection, "notifies", _notifies)
        self.wrap(connection, "conninfo_attempts", _no_dns)
        self.wrap(connection_async, "conninfo_attempts_async", _no_dns_async)

    def uninstall(self) -> None:
        # Patch.undo compares getattr(), which binds a classmethod: put _connect_gen back here.
        for p in self.patches:
            if isinstance(p.replacement, classmethod) and p.owner.__dict__.get(p.name) is p.replacement:
                setattr(p.owner, p.name, p.original)
        super().uninstall()
