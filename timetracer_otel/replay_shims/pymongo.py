"""pymongo: every command of ``MongoClient`` and ``AsyncMongoClient``, at the wire.

The OTel instrumentation traces pymongo through a global ``CommandListener``: its span is
not current during the call, so this shim finds it where the listener keeps it (by request id
and server address) instead.

All commands go through one pair of ``Connection`` methods (sync and asyncio alike):
``send_message`` with the encoded OP_MSG and ``receive_message`` for the server's reply. Record
reads the command out of the message (sections and document sequences decoded as they went on
the wire) and keeps the reply document (its BSON decoded losslessly: Int64, Decimal128,
ObjectId, Binary subtypes, naive UTC datetimes, DatetimeMS), its OP_MSG flags and the server's
``hello`` facts. Replay answers the connection with that reply, BSON-encoded again, so
pymongo's own decoder, with the client's own codec options (``tz_aware``, ``document_class``,
``uuidRepresentation``...), builds the values, and its own checks raise ``OperationFailure``,
``DuplicateKeyError`` or ``BulkWriteError`` from the server's answer as live. A network error
(``AutoReconnect``, ``NetworkTimeout``) is recorded as that error and raised again, closing
the connection as pymongo does; a ``NetworkTimeout`` only once the time the attempt took
live has passed (under ``timeoutMS``: once pymongo's own deadline has, at most a second
past that time), so pymongo's time budget ends as it did live and it retries only what it
retried live.

A connection whose handshake the recording did not see (its client connected before
``record()`` began: an app-wide client, every cassette after the first of a test session)
takes its server's facts from what pymongo knows: the description its topology keeps of
that server (kind, replica set name and members, primary, ``me``, wire versions, limits),
else the facts the handshake left on the connection.

In replay no connection reaches a server: a new one gets one end of a local socket pair, and its
``hello`` is answered from the recorded server facts (without ``topologyVersion``, so monitors
poll instead of streaming, and without ``compression``), so server selection, sessions and
retryable writes run as they did; a ``mongodb+srv://`` name resolves to the recorded replica
set's members without asking DNS. Authentication is skipped: a SCRAM exchange cannot be
replayed (its nonces are fresh), and it is never recorded.

The key is the database and the command without what changes on every run (``lsid``,
``$clusterTime``, ``txnNumber``, ``$readPreference``, ``maxTimeMS``, ``afterClusterTime``,
``recoveryToken``), which the stored request leaves out too; the server's address is not
part of it. Inserted documents carry ids the
client makes afresh, so an insert usually matches by shape (command and collection), marked
on its span and counted in the report. ``createUser``/``updateUser`` passwords become tokens.

Not replayed: exhaust cursors (``CursorType.EXHAUST``) raise :class:`ReplayUnsupportedError`;
a replay cannot pass a single pymongo call through to a server (``on_miss="passthrough"``),
since its connections were never opened: let pymongo stay live instead.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
import struct
import sys
import time
import weakref
from datetime import datetime, timezone
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from opentelemetry import trace
from pymongo import _csot
from pymongo.message import _OpMsg
from pymongo.server_type import SERVER_TYPE

from timetracer_otel.codec import Tree, from_tree, register, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.errors import ReplayMissError
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    BUILDERS,
    RECORD,
    STATE,
    Capture,
    Payload,
    Shim,
    answer_cancelled,
    built_payload,
    decide,
    defer,
    deferrable_given,
    error_tree,
    rebuild_error,
    unsupported,
    was_cancelled,
)

LIBRARY = "pymongo"
SCOPE = "opentelemetry.instrumentation.pymongo"

register(DatetimeMS, "bson.DatetimeMS", lambda v: int(v), lambda t: DatetimeMS(t))

# Decoding for the cassette: every BSON type as its own Python type, nothing converted.
_EXACT: CodecOptions[dict[str, Any]] = CodecOptions(
    document_class=dict, tz_aware=False, uuid_representation=UuidRepresentation.UNSPECIFIED,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)

_HEADER = struct.Struct("<iiii")
_OP_MSG, _OP_COMPRESSED = 2013, 2012
_CHECKSUM_PRESENT, _MORE_TO_COME = 1, 2

_HELLO = frozenset({"hello", "ismaster", "isMaster"})
_AUTH = frozenset({"saslStart", "saslContinue", "authenticate", "getnonce", "copydbgetnonce",
                   "copydbsaslstart"})
_WITH_PASSWORD = frozenset({"createUser", "updateUser"})
# Fields that differ on every run, left out of the key (kept in the stored request).
_VOLATILE = frozenset({"lsid", "$clusterTime", "txnNumber", "$readPreference", "maxTimeMS",
                       "recoveryToken", "$db"})
# What a replayed hello tells the client: the server's kind and limits, as recorded.
_SERVER_FACTS = ("isWritablePrimary", "ismaster", "secondary", "arbiterOnly", "hidden",
                 "passive", "setName", "setVersion", "electionId", "hosts", "passives",
                 "arbiters", "primary", "me", "msg", "maxWireVersion", "minWireVersion",
                 "maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize",
                 "logicalSessionTimeoutMinutes", "readOnly", "helloOk", "serviceId")
# A server to answer hello with when the cassette holds no pymongo call at all.
_STANDALONE: dict[str, Any] = {
    "isWritablePrimary": True, "ismaster": True, "helloOk": True, "maxWireVersion": 21,
    "minWireVersion": 0, "maxBsonObjectSize": 16 * 1024 * 1024,
    "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
    "logicalSessionTimeoutMinutes": 30, "readOnly": False,
}
# A read that ran out of time live: raised again once that time has passed in the replay too.
_TIMEOUTS = frozenset({"pymongo.errors:NetworkTimeout"})
# Cleanup the app never sees the answer of: acknowledged in replay when not recorded.
_CLEANUP = frozenset({"endSessions", "killCursors"})

# On a Connection: the call sent and not yet answered (record), or the answer (replay).
_PENDING = "_timetracer_pending"
_SERVER = "_timetracer_server"  # (replay: the facts a hello answers with)
_SERVER_TREE = "_timetracer_server_tree"  # (record: the facts the server gave, as a tree)
_CLOSING = "_timetracer_closing"  # (replay: an async connection's close, for its receive)
_connection_ids = itertools.count(1)


def _replaying() -> bool:
    return STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY)


# --- the request -----------------------------------------------------------------------------


def _sections(message: bytes | memoryview) -> tuple[int, int, dict[str, Any]] | None:
    """``(request id, flags, command)`` of an OP_MSG (compressed or not), document sequences
    folded into the command under their names as the server reads them; None for another op."""
    view = memoryview(message)
    _length, request_id, _to, op = _HEADER.unpack_from(view)
    body: memoryview = view[16:]
    if op == _OP_COMPRESSED:
        from pymongo.compression_support import decompress

        op, _size, compressor = struct.unpack_from("<iiB", body)
        body = memoryview(decompress(body[9:], compressor, 1 << 31))
    if op != _OP_MSG:
        return None
    flags = int.from_bytes(body[:4], "little")
    end = len(body) - (4 if flags & _CHECKSUM_PRESENT else 0)
    pos = 4
    command: dict[str, Any] | None = None
    sequences: dict[str, list[Any]] = {}
    while pos < end:
        kind = body[pos]
        size = int.from_bytes(body[pos + 1:pos + 5], "little")
        if kind == 0:
            command = bson.decode(body[pos + 1:pos + 1 + size], _EXACT)
        else:
            section = bytes(body[pos + 5:pos + 1 + size])
            name, _, docs = section.partition(b"\x00")
            sequences[name.decode()] = bson.decode_all(docs, _EXACT)
        pos += 1 + size
    if command is None:
        return None
    command.update(sequences)
    return request_id, flags, command


def _head(message: bytes) -> tuple[int, int, str] | None:
    """``(request id, flags, command name)`` of an OP_MSG without decoding its documents."""
    _length, request_id, _to, op = _HEADER.unpack_from(message)
    if op == _OP_MSG and message[20] == 0:  # the body section first, as pymongo sends it
        flags = int.from_bytes(message[16:20], "little")
        end = message.find(b"\x00", 26)  # the body's first element's name
        if end > 26:
            return request_id, flags, message[26:end].decode()
    parsed = _sections(message)  # compressed, or laid out otherwise
    return None if parsed is None else (parsed[0], parsed[1], next(iter(parsed[2])))


def _identity(command: dict[str, Any]) -> dict[str, Any]:
    if "endSessions" in command:  # the ids of the client's own fresh sessions: how many
        return {"endSessions": len(command["endSessions"] or ())}
    out = {k: v for k, v in command.items() if k not in _VOLATILE}
    concern = out.get("readConcern")
    if isinstance(concern, dict) and "afterClusterTime" in concern:
        out["readConcern"] = {k: v for k, v in concern.items() if k != "afterClusterTime"}
    return out


def _call(command: dict[str, Any]) -> Call:
    name = next(iter(command))
    db = command.get("$db", "admin")
    if name in _WITH_PASSWORD and isinstance(command.get("pwd"), str):
        command = {**command, "pwd": STATE.redactor.token(command["pwd"])}
    target = command[name]
    if not isinstance(target, str):  # getMore: the cursor id; the collection comes after
        target = command.get("collection")
    # Stored as keyed: the session id and cluster time would only add noise to every diff.
    # Fields named like secrets become tokens, and so do secrets seen elsewhere (a bearer token
    # the app also stores): keys fold tokens, as for HTTP bodies.
    r = STATE.redactor
    identity = r.scrub(r.document(to_tree({"db": db, "command": _identity(command)})))
    shape = {"db": db, "name": name, "on": target if isinstance(target, str) else None}
    label = f"{db}.{name}" + (f" {target}" if isinstance(target, str) else "")
    return Call(LIBRARY, identity, identity, shape, label)


# --- the reply -------------------------------------------------------------------------------


def _server_facts(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: reply[k] for k in _SERVER_FACTS if k in reply}


def _host(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _description(conn: Any) -> tuple[Any, Any] | None:
    """``(server description, topology)`` of the server ``conn``'s pool belongs to, as
    pymongo's topology keeps it (from its monitor's latest hello): found through the monitors
    pymongo registers (each refers to its topology), the server whose pool is ``conn``'s."""
    pool = conn.pool_ref()
    for name in ("pymongo.synchronous.monitor", "pymongo.asynchronous.monitor"):
        try:
            monitors = list(getattr(sys.modules.get(name), "_MONITORS", None) or ())
        except RuntimeError:  # (changed meanwhile by another thread: the next module)
            continue
        for ref in monitors:
            monitor = ref()
            try:
                topology = monitor._topology  # (a weak proxy: ReferenceError once freed)
                server = topology._servers.get(conn.address)
                if server is not None and server.pool is pool:
                    return server.description, topology
            except (AttributeError, ReferenceError):
                continue
    return None


def _described_facts(sd: Any, topology: Any, conn: Any) -> dict[str, Any] | None:
    """A hello's server facts (see ``_SERVER_FACTS``) made again from a server description,
    which keeps each of them (the arbiters among the hosts: as the topology describes them);
    None for a server pymongo does not know (yet) or a load balancer (no hello behind it)."""
    kind = sd.server_type
    if kind in (SERVER_TYPE.Unknown, SERVER_TYPE.LoadBalancer):
        return None
    facts: dict[str, Any] = {
        "isWritablePrimary": sd.is_writable, "ismaster": sd.is_writable,
        "maxWireVersion": sd.max_wire_version, "minWireVersion": sd.min_wire_version,
        "maxBsonObjectSize": sd.max_bson_size, "maxMessageSizeBytes": sd.max_message_size,
        "maxWriteBatchSize": sd.max_write_batch_size, "helloOk": bool(conn.hello_ok),
    }
    if sd.logical_session_timeout_minutes is not None:
        facts["logicalSessionTimeoutMinutes"] = sd.logical_session_timeout_minutes
    if kind == SERVER_TYPE.Mongos:
        facts["msg"] = "isdbgrid"
    elif kind == SERVER_TYPE.RSGhost:
        facts["isreplicaset"] = True
    elif sd.replica_set_name is not None:
        facts["setName"] = sd.replica_set_name
        facts["secondary"] = kind == SERVER_TYPE.RSSecondary
        if kind == SERVER_TYPE.RSArbiter:
            facts["arbiterOnly"] = True
        elif kind == SERVER_TYPE.RSOther:
            facts["hidden"] = True
        hosts: list[str] = []
        arbiters: list[str] = []
        for node in sorted(sd.all_hosts):
            member = topology._servers.get(node)
            arbiter = member is not None and member.description.server_type == SERVER_TYPE.RSArbiter
            (arbiters if arbiter else hosts).append(_host(node))
        facts["hosts"] = hosts
        if arbiters:
            facts["arbiters"] = arbiters
        for key, value in (("setVersion", sd.set_version), ("electionId", sd.election_id),
                           ("primary", sd.primary and _host(sd.primary)),
                           ("me", sd.me and _host(sd.me))):
            if value is not None:
                facts[key] = value
    return facts


def _handshake_facts(conn: Any) -> dict[str, Any]:
    """The server facts a connection's own handshake left on it (no replica set's name or
    members among them): for a connection whose topology cannot be found."""
    facts = dict(_STANDALONE)
    facts.update(isWritablePrimary=bool(conn.is_writable), ismaster=bool(conn.is_writable),
                 maxWireVersion=conn.max_wire_version, maxBsonObjectSize=conn.max_bson_size,
                 maxMessageSizeBytes=conn.max_message_size, helloOk=bool(conn.hello_ok),
                 maxWriteBatchSize=conn.max_write_batch_size)
    minutes = getattr(conn, "logical_session_timeout_minutes", None)
    if minutes is None:
        facts.pop("logicalSessionTimeoutMinutes")
    else:
        facts["logicalSessionTimeoutMinutes"] = minutes
    if conn.is_mongos:
        facts["msg"] = "isdbgrid"
    if conn.service_id is not None:
        facts["serviceId"] = conn.service_id
    return facts


def _known_server(conn: Any) -> Tree:
    """The server facts of a connection whose hello this recording did not see (its client
    connected before the recording began: an app-wide client, a later test's cassette):
    what pymongo knows of that server, kept on the connection for its next calls."""
    try:
        found = _description(conn)
        facts = None if found is None else _described_facts(*found, conn)
    except Exception:  # (pymongo's internals otherwise: the connection's own facts)
        facts = None
    if facts is None:
        facts = _handshake_facts(conn)
    facts["address"] = f"{conn.address[0]}:{conn.address[1]}"  # (where it was reached)
    tree: Tree = to_tree(facts)
    conn.__dict__[_SERVER_TREE] = tree
    return tree


def _reply_tree(flags: int, payload: bytes, server: Tree) -> Tree:
    doc = bson.decode(payload, _EXACT)
    return {"flags": flags, "reply": STATE.redactor.document(to_tree(doc)), "server": server}


def _build(args: Any) -> Payload:
    """The payload of a call left to the writer (see :func:`_recorded`), as a capture makes it."""
    message, flags, payload, server, error = args
    parsed = _sections(message)
    if parsed is None:  # (cannot happen: the request path read this message's head)
        raise ValueError("not an OP_MSG")
    call = _call(parsed[2])
    return built_payload(call, error, lambda: _reply_tree(flags, payload, server))


BUILDERS[LIBRARY] = _build


def _facts_of(span: Any) -> Any:
    return (span.response or {}).get("server") if isinstance(span.response, dict) else None


def _recorded_server(address: str | None = None) -> dict[str, Any]:
    """The facts of the server recorded at ``address`` (where the recording connected, or
    the member it named itself), else of the first recorded pymongo call's server, else a
    standalone server's: a recording of two deployments answers each as it was."""
    index = STATE.index
    span = None
    if index is not None and address is not None:
        def at(candidate: Any) -> bool:
            facts = _facts_of(candidate)
            return isinstance(facts, dict) and address in (facts.get("address"), facts.get("me"))

        span = index.first(LIBRARY, at)
    if span is None and index is not None:
        span = index.first(LIBRARY, lambda candidate: _facts_of(candidate) is not None)
    server = _facts_of(span) if span is not None else None
    if not server:
        return dict(_STANDALONE)
    facts = dict(from_tree(server))
    facts.pop("address", None)
    return facts


def _hello_reply(conn: Any) -> _OpMsg:
    address = f"{conn.address[0]}:{conn.address[1]}"
    facts = conn.__dict__.get(_SERVER)
    if facts is None:
        facts = conn.__dict__[_SERVER] = _recorded_server(address)
    doc = dict(facts)
    # The recorded member answers as recorded, so the client discovers the replica set (its
    # hosts, its primary) as it did, whatever seed this replay was given; another member of
    # that set answers as a secondary of it.
    me = doc.get("me")
    members = [*(doc.get("hosts") or ()), *(doc.get("passives") or ())]
    if me is not None and address != me and address in members:
        doc.update(me=address, isWritablePrimary=False, ismaster=False, secondary=True)
    doc["localTime"] = datetime.now(timezone.utc)
    doc["connectionId"] = next(_connection_ids)
    doc["ok"] = 1.0
    return _OpMsg(0, bson.encode(doc))


def _answered(conn: Any, match: Match) -> _OpMsg:
    span = match.span
    if span.error is not None:
        error = rebuild_error(span.error)
        closing = conn.close_conn(None)  # (closed as pymongo closes it on a network error)
        if closing is not None:  # an AsyncConnection's close, a coroutine: its receive awaits it
            conn.__dict__[_CLOSING] = closing
        raise error
    flags = int(span.response.get("flags") or 0)
    if flags & _MORE_TO_COME:
        raise unsupported(
            f"The recorded pymongo call {span.label} was an exhaust cursor "
            "(CursorType.EXHAUST), which replay does not support; use a normal cursor.",
            f"{span.label} (exhaust cursor)")
    return _OpMsg(flags, bson.encode(from_tree(span.response["reply"])))


def _cleanup_reply(command: dict[str, Any]) -> _OpMsg:
    doc: dict[str, Any] = {"ok": 1.0}
    if "killCursors" in command:
        doc.update(cursorsKilled=list(command.get("cursors") or []), cursorsNotFound=[],
                   cursorsAlive=[], cursorsUnknown=[])
    return _OpMsg(0, bson.encode(doc))


# --- the OTel span of a call -----------------------------------------------------------------


@functools.cache
def _instrumentor_class() -> Any:
    """The OTel pymongo instrumentor's class, or None where it is not installed (looked up
    once: a failed import per command would cost more than the command's own work here)."""
    try:
        from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
    except ImportError:
        return None
    return PymongoInstrumentor


def _listener_span(conn: Any, request_id: int) -> Any:
    """The instrumentation's span of this command, kept by its CommandListener."""
    # (the instrumentor is a singleton: its instance, once made, is a class attribute)
    instrumentor = getattr(_instrumentor_class(), "_instance", None)
    tracer = getattr(instrumentor, "_commandtracer_instance", None)
    spans = getattr(tracer, "_span_dict", None)
    if not spans:
        return None
    return spans.get((request_id, conn.address))


# --- the patched methods ---------------------------------------------------------------------


class _Sent:
    """A command sent while recording, waiting for its reply: captured here (``cap``; None
    for a hello, whose reply only teaches the server's facts), or left to the writer on its
    instrumentation span (``span``, with the message as sent)."""

    __slots__ = ("cap", "message", "request_id", "span")

    def __init__(self, request_id: int, cap: Capture | None, span: Any = None,
                 message: bytes = b"") -> None:
        self.request_id, self.cap, self.span, self.message = request_id, cap, span, message


def _on_send(conn: Any, message: bytes) -> Any:
    """What to do with a message: None (send it as it is), a :class:`_Sent` to record,
    or (replay) the answer to give when the reply is read."""
    head = _head(message)
    if head is None:
        return None
    request_id, flags, name = head
    replaying = _replaying()
    span = _listener_span(conn, request_id)
    if name in _HELLO and span is None:  # a handshake or a monitor's (the app's own is traced)
        return ("hello", request_id) if replaying else _Sent(request_id, None)
    if name in _AUTH or flags & _MORE_TO_COME:  # secrets, or a write nobody answers
        return ("none", request_id) if replaying else None
    if not replaying and STATE.defer:
        left = deferrable_given(span, SCOPE)
        if left is not None:  # the writer decodes, keys and redacts it
            return _Sent(request_id, None, left, bytes(message))
    parsed = _sections(message)
    if parsed is None:
        return None
    command = parsed[2]
    call = _call(command)
    if replaying:
        # Current while deciding, so the match is marked on it (and on no other span).
        with trace.use_span(span or trace.INVALID_SPAN, end_on_exit=False):
            try:
                action = decide(call)
            except ReplayMissError:
                if name in _CLEANUP:
                    return ("cleanup", request_id, command)
                raise
        if isinstance(action, Match):
            error = action.span.error
            if isinstance(error, dict) and error.get("type") in _TIMEOUTS:
                return ("timeout", request_id, action)
            return ("match", request_id, action)
        if name in _CLEANUP:  # (passthrough has no connection to pass it through)
            return ("cleanup", request_id, command)
        raise unsupported(
            f"{call.label} has no recorded answer and pymongo cannot pass one call through "
            "to a server during a replay (its connections were never opened); record it, "
            "or let pymongo stay live (TIMETRACER_LIVE_PLUGINS=pymongo).",
            f"{call.label} (no recording, cannot go live)")
    action = decide(call)
    if action is not RECORD:
        return None
    return _Sent(request_id, Capture(call, SCOPE, span=span))


def _recorded(conn: Any, sent: _Sent, reply: _OpMsg | None, error: BaseException | None) -> None:
    server = conn.__dict__.get(_SERVER_TREE)
    if server is None and (sent.cap is not None or sent.span is not None):  # (not a hello)
        server = _known_server(conn)  # its hello was not seen: what pymongo knows of it
    if sent.span is not None:
        payload = bytes(reply.payload_document) if reply is not None else b""
        defer(sent.span, LIBRARY, (sent.message, reply.flags if reply is not None else 0,
                                   payload, server, None if error is None else error_tree(error)))
        return
    cap = sent.cap
    if cap is None:  # a hello: the server's facts, for the calls that follow
        if reply is not None:
            facts = _server_facts(bson.decode(bytes(reply.payload_document), _EXACT))
            facts["address"] = f"{conn.address[0]}:{conn.address[1]}"  # (where it was reached)
            conn.__dict__[_SERVER_TREE] = to_tree(facts)
        return
    with cap:
        if error is not None:
            cap.fail(error)
        elif reply is not None:
            cap.ok(_reply_tree(reply.flags, bytes(reply.payload_document), server))


def _send_plan(conn: Any, message: bytes) -> _Sent | bool | None:
    """Before a message goes out: None (send it untouched), True (replay answered it: nothing
    goes out), or the :class:`_Sent` to keep once it is sent."""
    if _made_for_replay(conn):  # (one checked out before its replay ended: see _perished)
        _refuse_outside_replay()
    if STATE.mode is Mode.OFF:
        return None
    plan = _on_send(conn, message)
    if type(plan) is tuple:
        conn.__dict__[_PENDING] = plan
        return True
    return plan  # type: ignore[no-any-return]


class _Late:
    """A recorded network timeout, for the receive to raise once it has waited ``seconds``
    (see :func:`_timeout_wait`)."""

    __slots__ = ("conn", "match", "seconds")

    def __init__(self, conn: Any, match: Match) -> None:
        self.conn, self.match, self.seconds = conn, match, _timeout_wait(conn, match)

    def answer(self) -> _OpMsg:
        return _answered(self.conn, self.match)  # (raises the recorded timeout)


def _timeout_wait(conn: Any, match: Match) -> float:
    """How long a replayed read that timed out live waits before raising it: the time that
    attempt took live, so the app's time is spent as live, and its budget: pymongo retries
    a read that timed out with ``timeoutMS`` left, and none was left live. Under
    ``timeoutMS`` the live read ran until pymongo's deadline, so the replay waits until its
    own deadline (this replay's server selection and connecting, quicker, left more of it),
    though no more than a second past the live attempt's time; under ``socketTimeoutMS``,
    the live attempt's time, no more than the socket timeout pymongo set for this read."""
    span = match.span
    live = max(0, span.end_ns - span.start_ns) / 1e9
    left = _csot.remaining()
    if left is not None:
        return max(0.0, min(left, live + 1.0))
    limit = getattr(conn, "last_timeout", None)
    return live if not limit else min(live, float(limit))


def _replayed(conn: Any, plan: tuple[Any, ...]) -> _OpMsg | _Late:
    what = plan[0]
    if what == "hello":
        return _hello_reply(conn)
    if what == "match":
        return _answered(conn, plan[2])
    if what == "timeout":
        return _Late(conn, plan[2])
    if what == "cleanup":
        return _cleanup_reply(plan[2])
    return _OpMsg(0, bson.encode({"ok": 1.0}))


def _receive_plan(conn: Any, request_id: int | None) -> _OpMsg | _Late | _Sent | None:
    """Before a reply is read: None (read it untouched), the replayed reply, a recorded
    timeout to raise once it has waited (:class:`_Late`), or the :class:`_Sent` it answers
    (record)."""
    if STATE.mode is Mode.OFF:
        return None
    plan = conn.__dict__.pop(_PENDING, None)
    if plan is not None and (plan[1] if type(plan) is tuple else plan.request_id) != request_id:
        plan = None
    if type(plan) is tuple:
        return _replayed(conn, plan)
    if plan is None and _replaying():
        raise unsupported(
            "pymongo read a reply no command asked for (an exhaust cursor or a streaming "
            "monitor), which replay does not support.", "pymongo reply without a command")
    return plan  # type: ignore[no-any-return]


def _send_message(original: Any) -> Any:
    def send_message(self: Any, message: bytes, max_doc_size: int) -> None:
        plan = _send_plan(self, message)
        if plan is True:
            return
        try:
            original(self, message, max_doc_size)
        except Exception as exc:
            if isinstance(plan, _Sent):
                _recorded(self, plan, None, exc)
            raise
        if isinstance(plan, _Sent):
            self.__dict__[_PENDING] = plan

    return send_message


def _receive_message(original: Any) -> Any:
    def receive_message(self: Any, request_id: int | None) -> Any:
        plan = _receive_plan(self, request_id)
        if not isinstance(plan, _Sent):
            if plan is None:
                return original(self, request_id)
            if type(plan) is _Late:
                time.sleep(plan.seconds)
                return plan.answer()
            return plan
        try:
            reply = original(self, request_id)
        except Exception as exc:
            _recorded(self, plan, None, exc)
            raise
        _recorded(self, plan, reply, None)
        return reply

    return receive_message


def _async_send_message(original: Any) -> Any:
    async def send_message(self: Any, message: bytes, max_doc_size: int) -> None:
        plan = _send_plan(self, message)
        if plan is True:
            return
        try:
            await original(self, message, max_doc_size)
        except Exception as exc:
            if isinstance(plan, _Sent):
                _recorded(self, plan, None, exc)
            raise
        if isinstance(plan, _Sent):
            self.__dict__[_PENDING] = plan

    return send_message


def _async_receive_message(original: Any) -> Any:
    async def receive_message(self: Any, request_id: int | None) -> Any:
        pending = self.__dict__.get(_PENDING)
        if type(pending) is tuple and pending[0] == "match" and pending[1] == request_id \
                and was_cancelled(pending[2].span):  # (see base.answer_cancelled)
            del self.__dict__[_PENDING]
            return await answer_cancelled(pending[2].span)
        try:
            plan = _receive_plan(self, request_id)
            if type(plan) is _Late:
                await asyncio.sleep(plan.seconds)
                plan = plan.answer()
        except Exception:
            closing = self.__dict__.pop(_CLOSING, None)
            if closing is not None:  # (a replayed network error: the connection closed)
                await closing
            raise
        if not isinstance(plan, _Sent):
            return await original(self, request_id) if plan is None else plan
        try:
            reply = await original(self, request_id)
        except (Exception, asyncio.CancelledError) as exc:  # (one cancelled kept: live order)
            _recorded(self, plan, None, exc)
            raise
        _recorded(self, plan, reply, None)
        return reply

    return receive_message


# --- connections that never reach a server (replay) ------------------------------------------

# The networking interfaces of the connections a replay made (their sockets reach no server).
_REPLAY_MADE: weakref.WeakSet[Any] = weakref.WeakSet()
_MADE = [False]  # whether a replay ever made one in this process


def _made_for_replay(conn: Any) -> bool:
    """A connection a replay made, now outside any replay."""
    return _MADE[0] and conn.conn in _REPLAY_MADE and not _replaying()


def _perished(original: Any, is_async: bool) -> Any:
    """``Pool._perished``: a connection a replay made, checked out after its replay ended, is
    closed and replaced there, before the app's operation uses it (a write is not retried)."""
    from pymongo.monitoring import ConnectionClosedReason

    if is_async:
        async def perished(self: Any, conn: Any) -> bool:
            if _made_for_replay(conn):
                await conn.close_conn(ConnectionClosedReason.STALE)
                return True
            return bool(await original(self, conn))

        return perished

    def perished_sync(self: Any, conn: Any) -> bool:
        if _made_for_replay(conn):
            conn.close_conn(ConnectionClosedReason.STALE)
            return True
        return bool(original(self, conn))

    return perished_sync


def _refuse_outside_replay() -> None:
    """A connection a replay made, used after its replay ended (an app-wide client, a cursor
    still open): nothing would ever answer it, so pymongo is told it is lost, as a dropped
    connection is, and replaces it with a real one (a retryable read goes on there)."""
    from pymongo.errors import AutoReconnect

    raise AutoReconnect("this connection was made by a timetracer-otel replay, which has "
                        "ended; it reaches no server")



def _local_socket() -> socket.socket:
    """One end of a socket pair: a real descriptor for pymongo's timeouts, liveness checks and
    close, its peer kept open as long as it lives (an open peer: never readable, never closed)."""
    ours, peer = socket.socketpair()
    weakref.finalize(ours, peer.close)
    return ours


def _socket_interface(original: Any) -> Any:
    def configured(address: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        if not _replaying():
            return original(address, options, *args, **kwargs)
        from pymongo.network_layer import NetworkingInterface

        sock = _local_socket()
        sock.settimeout(options.socket_timeout)
        interface = NetworkingInterface(sock)
        _REPLAY_MADE.add(interface)
        _MADE[0] = True
        return interface

    return configured


def _protocol_interface(original: Any) -> Any:
    async def configured(address: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        if not _replaying():
            return await original(address, options, *args, **kwargs)
        import asyncio

        from pymongo.network_layer import AsyncNetworkingInterface, PyMongoProtocol

        sock = _local_socket()
        sock.setblocking(False)
        timeout = options.socket_timeout
        pair = await asyncio.get_running_loop().create_connection(
            lambda: PyMongoProtocol(timeout=timeout), sock=sock)
        interface = AsyncNetworkingInterface(pair)
        _REPLAY_MADE.add(interface)
        _MADE[0] = True
        return interface

    return configured


def _recorded_hosts(fqdn: str) -> list[tuple[str, int]]:
    """A ``mongodb+srv://`` name's hosts in replay: the recorded replica set's members (no DNS)."""
    hosts = _recorded_server().get("hosts") or []
    out = []
    for host in hosts:
        name, _, port = str(host).rpartition(":")
        out.append((name.strip("[]"), int(port or 27017)))
    return out or [(fqdn, 27017)]


def _srv(original: Any, answer: Any) -> Any:
    def resolved(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _replaying():
            return answer(self._SrvResolver__fqdn)
        return original(self, *args, **kwargs)

    return resolved


def _async_srv(original: Any, answer: Any) -> Any:
    async def resolved(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _replaying():
            return answer(self._SrvResolver__fqdn)
        return await original(self, *args, **kwargs)

    return resolved


# What a replay answers for a mongodb+srv:// name instead of asking DNS: no TXT options, the
# recorded members as its SRV hosts (with a minute's TTL for the SRV monitor).
_SRV_ANSWERS: dict[str, Any] = {
    "get_options": lambda fqdn: None,
    "get_hosts": _recorded_hosts,
    "get_hosts_and_min_ttl": lambda fqdn: (_recorded_hosts(fqdn), 60),
}


def _authenticate(original: Any) -> Any:
    def authenticate(*args: Any, **kwargs: Any) -> Any:
        if _replaying():
            return None  # nothing to prove to a server that is not there
        return original(*args, **kwargs)

    return authenticate


def _async_authenticate(original: Any) -> Any:
    async def authenticate(*args: Any, **kwargs: Any) -> Any:
        if _replaying():
            return None
        return await original(*args, **kwargs)

    return authenticate


class PymongoShim(Shim):
    library = LIBRARY
    requires = "pymongo"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.pymongo:PymongoInstrumentor"

    def patch(self) -> None:
        import pymongo.asynchronous.auth
        import pymongo.asynchronous.pool
        import pymongo.synchronous.auth
        import pymongo.synchronous.pool

        self.wrap(pymongo.synchronous.pool.Connection, "send_message", _send_message)
        self.wrap(pymongo.synchronous.pool.Connection, "receive_message", _receive_message)
        self.wrap(pymongo.asynchronous.pool.AsyncConnection, "send_message",
                  _async_send_message)
        self.wrap(pymongo.asynchronous.pool.AsyncConnection, "receive_message",
                  _async_receive_message)
        self.wrap(pymongo.synchronous.pool.Pool, "_perished", lambda o: _perished(o, False))
        self.wrap(pymongo.asynchronous.pool.Pool, "_perished", lambda o: _perished(o, True))
        self.wrap(pymongo.synchronous.pool, "_configured_socket_interface", _socket_interface)
        self.wrap(pymongo.asynchronous.pool, "_configured_protocol_interface",
                  _protocol_interface)
        self.wrap(pymongo.synchronous.auth, "authenticate", _authenticate)
        self.wrap(pymongo.asynchronous.auth, "authenticate", _async_authenticate)
        try:  # (mongodb+srv:// needs dnspython)
            import pymongo.asynchronous.srv_resolver
            import pymongo.synchronous.srv_resolver
        except ImportError:
            return
        for name, answer in _SRV_ANSWERS.items():
            self.wrap(pymongo.synchronous.srv_resolver._SrvResolver, name,
                      functools.partial(_srv, answer=answer))
            self.wrap(pymongo.asynchronous.srv_resolver._SrvResolver, name,
                      functools.partial(_async_srv, answer=answer))
