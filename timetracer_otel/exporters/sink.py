"""The cassette writer's own process: spans leave the app's process as soon as they end.

CPython runs one thread at a time per process. A writer thread converting, redacting and
encoding spans in the app's process takes the interpreter from the app for as long as that
work lasts, whatever the number of cores: scenario 1b measured that work (about 20 µs of a
recorded call's overhead on a 2-core VM) as large as the request path's own. So an in-app
:class:`~timetracer_otel.exporters.writer.CassetteWriter` hands each finished span's snapshot,
msgpack-encoded in batches, to a child process over a pipe, and that child runs an ordinary
in-process writer: the same conversion, grouping, redaction and atomic writes, on the other
core. The app's writer thread only encodes tuples (in C) and writes to the pipe (without the
interpreter lock).

Parent → child, length-prefixed msgpack frames (``[tag, ...]``):

- ``open config``: the writer's settings; first, once.
- ``redactor pickle`` / ``learn [[value, token]...]``: the app's redactor, then the secrets it
  learns later, sent before the spans they may have to be scrubbed from.
- ``resource id attributes``: a provider's resource, once, before its first span.
- ``spans [wire...]``: snapshots (see :func:`wire`), in the order the spans ended; each is
  encoded by the app thread that ended the span, and a frame joins them (:func:`spans_frame`).
- ``drop [trace id...]``: traces that lost spans to a full queue.
- ``flush process`` / ``close``: answered with ``[written paths since the last answer,
  stats]``; ``close`` then ends the child.

The child ignores the terminal's signals (its own process group) and finishes what it was
sent if the app dies: a pipe at end of file closes the writer, which writes every open trace.
It has a session of its own, unless it runs at idle priority (``TIMETRACER_WRITER_PRIORITY``
``auto``, the default, where the app may give it its priority back, or ``idle``): Linux
shares CPU time fairly between sessions' autogroups first, so a priority set inside a child
of its own session cannot count against the app and its neighbours (see
:func:`lower_priority`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pickle
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from timetracer_otel.exporters.spans import snapshot
from timetracer_otel.replay_shims.base import DEFERRED

log = logging.getLogger("timetracer_otel")

# Set in the child's environment: a writer there never starts a child of its own.
CHILD_ENV = "TIMETRACER_WRITER_CHILD"
# A pipe's write end that `timetracer-otel record` gave the command: each child holds it too,
# and `record` reads the pipe to its end, so it counts cassettes once every child is done.
HOLD_FD_ENV = "TIMETRACER_HOLD_FD"
_HEADER = struct.Struct(">I")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_LOW = (1 << 64) - 1
_KIND_VALUES = {id(k): k.value for k in SpanKind}
_CODE_VALUES = {id(c): c.value for c in StatusCode}

# Spans per frame at most (the writer thread sends what it has when its queue runs empty).
MAX_FRAME_SPANS = 512
# Seconds to wait for the child to answer a flush before it is taken for dead.
REPLY_TIMEOUT = 120.0
# Started with -I (no PYTHONPATH, no user site, no sitecustomize: opentelemetry-instrument's
# would instrument the child and make it record itself), with the parent's sys.path instead.
_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from timetracer_otel.exporters.sink import main; main()"
)


class SinkError(Exception):
    """The child cannot take more: it exited, or stopped answering."""


def available() -> bool:
    """A child can be started: there is an interpreter to start (not an embedding host such as
    uWSGI, whose ``sys.executable`` is not Python), and this is not a child already."""
    exe = os.path.basename(sys.executable or "")
    return exe.startswith(("python", "pypy")) and not os.environ.get(CHILD_ENV)


def cpus(root: str = "/sys/fs/cgroup") -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's
    ``--cpus`` / Kubernetes CPU limit), v2 or v1."""
    try:
        count: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = None
    try:
        with open(os.path.join(root, "cpu.max")) as f:  # v2: "max 100000" or "150000 100000"
            limit, period = f.read().split()[:2]
            if limit != "max":
                quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                limit_us = int(f.read())
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period_us = int(f.read())
            if limit_us > 0 and period_us > 0:
                quota = limit_us / period_us
        except (OSError, ValueError):
            pass
    return min(count, quota) if quota is not None else count


def wire(snap: tuple[Any, ...], rid: int) -> tuple[Any, ...]:
    """A snapshot as msgpack can carry it: the 128-bit trace id in two halves, kind and status
    as their values, events as tuples, the resource by the id the child knows it by."""
    status, events = snap[8], snap[9]
    code = status.status_code
    trace_id = snap[0]
    kind = _KIND_VALUES.get(id(snap[5]))
    value = _CODE_VALUES.get(id(code))
    return (
        trace_id >> 64, trace_id & _LOW, snap[1], snap[2], snap[3], snap[4],
        snap[5].value if kind is None else kind, snap[6], snap[7],
        code.value if value is None else value, status.description,
        [(e.name, e.timestamp, dict(e.attributes) if e.attributes else None) for e in events]
        if events else None,
        snap[10], rid, snap[12],
    )


def wired(span: Any, rid: int) -> tuple[Any, ...]:
    """``wire(snapshot(span), rid)`` read straight from an SDK span's fields (the request
    path's step for the writer process: no snapshot tuple in between, ~40% fewer bytecodes
    per span); other spans go through :func:`~timetracer_otel.exporters.spans.snapshot`."""
    try:
        ctx, parent, status, attributes = span._context, span._parent, span._status, span._attributes
        kind = _KIND_VALUES.get(id(span._kind))
        code = _CODE_VALUES.get(id(status.status_code))
        inner = getattr(attributes, "_dict", None)
        events = span._events
        if type(ctx) is SpanContext and (parent is None or type(parent) is SpanContext) \
                and type(events) is BoundedList and kind is not None and code is not None \
                and type(inner) is dict:
            trace_id, dq = ctx[0], events._dq  # type: ignore[attr-defined]
            return (
                trace_id >> 64, trace_id & _LOW, ctx[1], None if parent is None else parent[1],
                parent is not None and parent[2], span._name, kind, span._start_time or 0,
                span._end_time or 0, code, status.description,
                [(e.name, e.timestamp, dict(e.attributes) if e.attributes else None) for e in dq]
                if dq else None,
                inner, rid, attributes.__dict__.get(DEFERRED),
            )
    except AttributeError:  # not the SDK's own span: its public view
        pass
    return wire(snapshot(span), rid)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_SPANS = _encode("spans")


def spans_frame(encoded: list[bytes]) -> bytes:
    """The body of a ``spans`` frame from spans each encoded alone (msgpack: an array of two,
    the tag, and an array of them)."""
    return b"\x92" + _SPANS + _array_header(len(encoded)) + b"".join(encoded)


# --- parent side -----------------------------------------------------------------------------


class SinkProcess:
    """The parent's handle on one child: send frames, ask and wait for answers. Used by one
    thread (the writer's); every failure raises :class:`SinkError`."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        env = dict(os.environ)
        env[CHILD_ENV] = "1"
        config = dict(config)
        # idle where asked for, or with auto where the child's priority can be given back;
        # normal otherwise.
        asked = config.get("priority", "normal")
        restorable = asked in ("idle", "auto") and can_restore_priority()
        idle = asked == "idle" or (asked == "auto" and restorable)
        config["priority"] = "idle" if idle else "normal"
        # An idle child this process may raise to its own priority (see _update): while the
        # app waits for an answer (and for good once it asked the child to close), while the
        # child is behind (its unread backlog), and while it is starved (check_starved).
        self.raisable = idle and restorable
        self._raised = self._asking = self._closing = self._behind = False
        self._starved_until: float | None = None
        # The starvation watch: the last look at the child's wait for a core, and when a
        # frame last went out.
        self._look: tuple[float, int] | None = None
        self._last_send = self._last_watch = 0.0
        # A session of its own (no controlling terminal: the terminal's signals cannot reach
        # it). At idle priority its own process group in the app's session instead, where
        # the priority counts against the app's tasks (see lower_priority); it ignores
        # SIGTTOU there, so `stty tostop` cannot stop it when it logs a warning.
        group: dict[str, Any] = {"start_new_session": True}
        if idle and sys.version_info >= (3, 11):
            group = {"process_group": 0}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT,
             json.dumps([os.fspath(p) for p in sys.path if isinstance(p, str | os.PathLike)])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
            pass_fds=_held(), **group,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if idle:
            lower_priority(self.proc.pid)
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        self._pipe_size = 1 << 16
        try:  # room for bursts, so the writer thread waits on the child less often (Linux)
            import fcntl

            fcntl.fcntl(self._in, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
            self._pipe_size = fcntl.fcntl(self._in, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        except (ImportError, OSError):
            pass
        self.send("open", config)

    def send(self, *message: Any) -> None:
        self.send_encoded(_encode(message))

    def send_encoded(self, body: bytes) -> None:
        if self.raisable:
            # The watch at most every BACKLOG_INTERVAL, or for a frame that is a large part
            # of the pipe, not for every frame: the writer thread sends as soon as its queue
            # runs empty, often a span at a time, and each look is an ioctl and its Python
            # on the thread that takes the app's interpreter lock.
            now = time.monotonic()
            self._last_send = now
            if now - self._last_watch >= BACKLOG_INTERVAL or len(body) >= self._pipe_size >> 4:
                self._last_watch = now
                self._watch_backlog()
                self.check_starved()
        data = memoryview(_HEADER.pack(len(body)) + body)
        try:
            while data:
                data = data[os.write(self._in, data):]
        except OSError as exc:
            raise SinkError(f"the cassette writer process is gone ({self._exit()})") from exc

    def ask(self, *message: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        # The app waits for the answer: the child no longer runs on spare CPU time only.
        self._asking, self._closing = True, self._closing or message[0] == "close"
        self._update()
        try:
            self.send(*message)
            try:
                reply = _read_frame(self._out, timeout)
            except OSError as exc:
                raise SinkError(f"no answer from the cassette writer process ({exc})") from exc
            if reply is None:
                raise SinkError(f"the cassette writer process is gone ({self._exit()})")
            return _decode(reply)
        finally:
            self._asking = False
            self._update()

    def _update(self) -> None:
        """A raisable child at the app's priority while any reason holds, at idle otherwise."""
        if not self.raisable:
            return
        raised = self._asking or self._closing or self._behind or self._starved_until is not None
        if raised != self._raised:
            self._raised = raised
            set_policy(self.proc.pid, os.SCHED_OTHER if raised else os.SCHED_IDLE)

    def watching(self) -> bool:
        """Whether the writer thread should look at the child every WATCH_INTERVAL even with
        nothing to send: an idle child that was sent a frame in the last QUIET_WATCH seconds
        (it may still be working on it), or that is raised for starvation."""
        return self.raisable and (
            time.monotonic() - self._last_send < QUIET_WATCH or self._starved_until is not None)

    def check_starved(self) -> None:
        """One look (at most every WATCH_INTERVAL; the writer thread calls this as it sends,
        and while :meth:`watching` when it has nothing to send): an idle child that was
        runnable but not running for half the time since the last look (every core kept busy
        by others) gets the app's priority for STARVED_BOOST seconds, so what it holds
        reaches the disk in bounded time, flushed or not; then it tries idle again. One small
        read of its schedstat per look."""
        if not self.raisable:
            return
        now = time.monotonic()
        if self._look is not None and now - self._look[0] < WATCH_INTERVAL:
            return
        wait = _wait_ns(self.proc.pid)
        if wait is None:
            return
        if self._look is not None and wait - self._look[1] >= (now - self._look[0]) * 0.5e9:
            self._starved_until = now + STARVED_BOOST
        elif self._starved_until is not None and now >= self._starved_until:
            self._starved_until = None
        self._look = (now, wait)
        self._update()

    def _watch_backlog(self) -> None:
        """Boost the child while what it has not read yet fills half its pipe (it is falling
        behind: the app's queue fills next), until it has read all but an eighth."""
        try:
            import fcntl
            import termios

            waiting = struct.unpack("i", fcntl.ioctl(self._in, termios.FIONREAD, b"\0" * 4))[0]
        except (ImportError, OSError):
            return
        if waiting >= self._pipe_size // 2:
            self._behind = True
        elif waiting <= self._pipe_size // 8:
            self._behind = False
        self._update()

    def _exit(self) -> str:
        code = self.proc.poll()
        return "still running" if code is None else f"exit code {code}"

    def disown(self) -> None:
        """In a process forked from the one that started the child: close this process's
        copies of the pipes (so the child still sees the end of its input when its parent
        closes), without a word to the child, which is not this process's to stop or reap."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Let the child end (its input at end of file), then reap it; kill it if it hangs."""
        self.disown()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# An idle child's starvation watch (see SinkProcess.check_starved): seconds between looks,
# how long a starved child keeps the app's priority before it tries idle again, and how long
# after the last frame sent the writer thread keeps looking while it has nothing to send.
WATCH_INTERVAL = 0.1
STARVED_BOOST = 1.0
QUIET_WATCH = 5.0
# Seconds between looks at an idle child's unread backlog as frames go out (half its 1 MiB
# pipe takes far longer to fill).
BACKLOG_INTERVAL = 0.01


def _wait_ns(pid: int) -> int | None:
    """Nanoseconds process ``pid``'s main thread has been runnable but not running (its
    schedstat's second field); None once it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def set_policy(pid: int, policy: int) -> None:
    """Every thread of process ``pid`` to scheduling ``policy``; a thread that cannot be
    changed (gone, or the right withdrawn) is left as it is."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))


def idle_policies() -> bool:
    """This system has Linux's SCHED_IDLE, and Popen can start the child in a process group
    of the app's session (Python 3.11+)."""
    return hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setscheduler") \
        and sys.version_info >= (3, 11)


def can_restore_priority() -> bool:
    """Whether this process may move a task of its own from SCHED_IDLE back to SCHED_OTHER:
    the kernel asks for CAP_SYS_NICE or an RLIMIT_NICE allowing the task's nice value, as for
    lowering a nice value. Tried on a thread started for it, which then ends."""
    if not idle_policies():
        return False
    answer: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, name="timetracer-priority-probe", daemon=True)
    thread.start()
    thread.join()
    return answer == [True]


def _held() -> tuple[int, ...]:
    try:
        fd = int(os.environ.get(HOLD_FD_ENV, ""))
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # another file took that number since
            return ()
    except (ValueError, OSError):
        return ()
    return (fd,)


# Written to the held pipe (see HOLD_FD_ENV) for each failure that may have lost a cassette:
# `timetracer-otel record` counts them, and exits 2 where the command itself succeeded.
FAILURE_MARK = b"!"


def report_failure() -> None:
    """Tell `timetracer-otel record`, when it started this process, that a cassette may be
    lost (a full disk, a storage error); nothing otherwise. Never raises."""
    for fd in _held():
        with contextlib.suppress(OSError):
            os.write(fd, FAILURE_MARK)


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise OSError(f"timed out after waiting for {n - left} of {n} bytes")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, timeout: float | None = None) -> bytes | None:
    """The next frame's body; None at end of file."""
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0], deadline)
    if body is None:
        return None
    return body


# --- child side ------------------------------------------------------------------------------

# The child writes its encoded cassettes in rounds: once no frame has come for IDLE_GRACE
# (longer than the app's writer thread gathers spans, so a steady stream of frames is not
# idle), or while frames keep coming, when the oldest has waited BATCH_DELAY or MAX_BATCH
# are waiting (and on flush, close, or the app's end). Each round's fsyncs are made together,
# and on a VM every round's disk flush also costs the app's own core (its interrupts, the
# filesystem's journal thread): with a round whenever no frame was waiting (~20 a second at
# 1b's rate) a recorded httpx call cost the request thread 5-7 µs more CPU than with the
# spans never shipped to the child; with 0.5 s rounds, within noise of it (1b's loop, 15
# rounds each way). The idle grace bounds what dies with the child when it cannot outlive
# the app (the app as PID 1 of a container, a cgroup kill): a quiet app's cassettes are on
# disk IDLE_GRACE after the writer thread sends them.
IDLE_GRACE = 0.1
BATCH_DELAY = 0.5
MAX_BATCH = 256

_KINDS = {k.value: k for k in SpanKind}
_CODES = {c.value: c for c in StatusCode}


class _Status(NamedTuple):
    status_code: StatusCode
    description: str | None


class _Event(NamedTuple):
    name: str
    timestamp: int
    attributes: dict[str, Any] | None


class _Resource:
    __slots__ = ("attributes",)

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.attributes = attributes


def rebuild_snapshot(data: bytes, resources: Mapping[int, Any],
                     statuses: dict[Any, Any]) -> tuple[Any, ...]:
    """One encoded span (:func:`wire`) back as a snapshot, where the child is gone."""
    return _snapshot(_decode(data), resources, statuses)


def _snapshot(w: list[Any], resources: Mapping[int, Any],
              statuses: dict[Any, Any]) -> tuple[Any, ...]:
    """The snapshot :func:`wire` was made from, with stand-ins for the SDK's objects (the
    conversion reads only their fields)."""
    hi, lo, span_id, parent_id, remote, name, kind, start, end, code, desc, events, attrs, rid, \
        deferred = w
    status = statuses.get((code, desc))
    if status is None:
        status = statuses[(code, desc)] = _Status(_CODES[code], desc)
    return ((hi << 64) | lo, span_id, parent_id, remote, name, _KINDS[kind], start, end, status,
            tuple(_Event(*e) for e in events) if events else (), attrs, resources[rid], deferred)


def lower_priority(pid: int) -> None:
    """An idle child's CPU priority (``TIMETRACER_WRITER_PRIORITY``), set by the parent as
    the child starts, before it reads anything (set by the child, it could undo a boost the
    parent had already given it).

    Linux's SCHED_IDLE, for the child's main thread and the threads it starts (the fsync
    pool). A task of any other policy waking on a core preempts it at
    once, and the scheduler places waking tasks on a core that runs only idle tasks as on a
    free one: the conversions and disk flushes run in the time the app, its upstreams and
    its neighbours leave (scenario 1's paired rows measure the waits for a core it saves).
    While every core stays busy it gets almost no CPU, so the parent gives it the app's
    priority back while the app waits for it (:meth:`SinkProcess.ask`), while its
    backlog fills half its pipe and while it is starved (:meth:`SinkProcess.check_starved`),
    where the system lets it (:func:`can_restore_priority`), and the child takes it back
    itself once the app is gone. Elsewhere the lowest nice,
    which nothing gives back. The writer thread in the app's process keeps the app's
    priority: it holds the interpreter lock while it runs."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)


# The child's cyclic garbage collector: what it imported is frozen (never traversed again)
# and a young collection waits for this many more tracked objects made than freed. The
# child's data is acyclic (decoded frames, trees, records freed by reference counting), but
# with the interpreter's defaults (700) it collected ~25 times a second at scenario 1's rate,
# and each full collection walked every module object it had imported: about a tenth of its
# CPU time. Cycles (an exception's traceback) are still collected, later.
GC_THRESHOLD = 20_000


def _tune_gc() -> None:
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def restore_priority() -> None:
    """This idle process's threads back to SCHED_OTHER, where it may (see
    :func:`can_restore_priority`); nothing otherwise."""
    with contextlib.suppress(AttributeError, OSError):
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            set_policy(os.getpid(), os.SCHED_OTHER)


def main() -> None:
    """The child: read frames from stdin until ``close`` or end of file, answer on stdout.

    One thread: each span is converted as its frame is read (while it converts, the pipe
    and then the app's queue hold what comes next, so memory stays bounded), and encoded
    cassettes are written in rounds (see :data:`BATCH_DELAY`)."""
    from timetracer_otel.cassette import Recorder
    from timetracer_otel.exporters.writer import CassetteWriter
    from timetracer_otel.replay_shims.base import STATE

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGTTOU"):  # in the app's session (idle): `stty tostop` cannot stop it
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    _tune_gc()
    answers = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the answers
    sys.stdout = sys.stderr
    resources: dict[int, _Resource] = {}
    statuses: dict[tuple[int, str | None], _Status] = {}
    writer: CassetteWriter | None = None

    def answer() -> None:
        assert writer is not None
        written, writer.written = writer.written, []  # reported once: the child keeps none
        body = _encode((written, writer.stats()))
        data = memoryview(_HEADER.pack(len(body)) + body)
        while data:
            data = data[os.write(answers, data):]

    while True:
        if writer is not None and writer._unwritten:
            # A round once no frame has come for IDLE_GRACE, or once the oldest encoded
            # cassette has waited BATCH_DELAY while frames kept coming (_emit writes one at
            # MAX_BATCH).
            wait = writer.max_batch_delay - (time.perf_counter() - writer._unwritten_since)
            if wait <= 0 or not select.select([0], [], [], min(wait, IDLE_GRACE))[0]:
                writer.flush_now(False)
        frame = _read_frame(0)
        if frame is None:  # the app is gone: write what it sent, no longer at idle priority
            if writer is not None:
                restore_priority()
                writer.close_now()
            return
        tag = None
        try:
            tag, *rest = _decode(frame)
            if tag == "spans":
                assert writer is not None
                for w in rest[0]:
                    try:
                        snap = _snapshot(w, resources, statuses)
                    except Exception:  # a span this child cannot read: counted, the rest go on
                        writer._failed()
                        continue
                    writer.add_now(snap)
            elif tag == "resource":
                resources[rest[0]] = _Resource(rest[1])
            elif tag == "learn":
                STATE.redactor.learn(rest[0])
            elif tag == "redactor":
                STATE.redactor = pickle.loads(rest[0])
            elif tag == "drop":
                assert writer is not None
                writer._dropped_traces.update(rest[0])
            elif tag == "flush":
                assert writer is not None
                writer.flush_now(rest[0])
                answer()
            elif tag == "close":
                assert writer is not None
                writer.close_now()
                answer()
                return
            elif tag == "open":
                config = rest[0]
                writer = CassetteWriter(
                    config["location"], fmt=config["fmt"], via=config["via"],
                    max_queue=config["max_queue"], max_open_traces=config["max_open_traces"],
                    quiet_ns=config["quiet_ns"], sample_rate=config["sample_rate"],
                    errors_only=config["errors_only"], isolate=False,
                )
                writer.script = config["script"]
                writer.max_batch_delay, writer.max_batch = BATCH_DELAY, MAX_BATCH
                STATE.max_payload_bytes = config["max_payload_bytes"]
                writer._recorder = msgspec.convert(config["recorder"], Recorder)
        except Exception:  # one bad frame costs its spans, never the others
            log.warning("timetracer-otel: the cassette writer process failed on a frame",
                        exc_info=True)
            if writer is not None:
                writer.errors += 1
                if tag in ("flush", "close"):  # the app waits for an answer
                    answer()
                    if tag == "close":
                        return
