"""``timetracer-otel``: record and replay commands, and tools to look at cassettes.

Exit codes: 0 ok; 1 differences or replay failures; 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from timetracer_otel.cassette import (
    FORMATS,
    Cassette,
    SpanRecord,
    find_cassettes,
    load_cassette,
    loads,
    save_cassette,
)
from timetracer_otel.config import OnMiss, Settings, library_names
from timetracer_otel.errors import CassetteError, ConfigError, TimetracerError, without_passwords
from timetracer_otel.exporters.sink import FAILURE_MARK, HOLD_FD_ENV
from timetracer_otel.exporters.storage import (
    is_remote,
    load_one,
    read_source,
    source_names,
    storage_for,
)
from timetracer_otel.index import ReplayIndex, ReplayReport
from timetracer_otel.text import printable

F = TypeVar("F", bound=Callable[..., Any])

class _OutputError(TimetracerError):
    """Standard output cannot be written (a full disk, a closed pipe)."""


@contextlib.contextmanager
def _writing_output() -> Iterator[None]:
    """Output that cannot be written is one line and exit code 2, not a traceback."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        with contextlib.suppress(OSError):  # what is still buffered goes nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise _OutputError(f"cannot write the output ({exc.strerror or exc}); check where "
                           "standard output goes (a full disk? a closed pipe?).") from None


def _user_errors(fn: F) -> F:
    """Our own errors become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TimetracerError as exc:
            # (a path or a cassette's text in the message: shown, never obeyed)
            click.echo(f"timetracer-otel: {printable(without_passwords(str(exc)))}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="timetracer-otel")
def main() -> None:
    """Record a request and every dependency call it makes; replay it anywhere."""


def _instrument_command(cmd: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``opentelemetry-instrument CMD...``, found next to this interpreter first; a command
    the child's PATH does not have is bad input here, not a traceback from the launcher."""
    local = Path(sys.executable).with_name("opentelemetry-instrument")
    exe = str(local) if local.exists() else shutil.which("opentelemetry-instrument")
    if exe is None:
        raise ConfigError(
            "opentelemetry-instrument is not installed; pip install 'timetracer-otel[all]'."
        )
    if shutil.which(cmd[0], path=env.get("PATH", os.defpath)) is None:
        raise ConfigError(f"{cmd[0]}: command not found (or not executable); check the command after --.")
    return [exe, *cmd]


def _run(cmd: Sequence[str], env: dict[str, str], hold: bool = False) -> tuple[int, int]:
    """Run the instrumented command, passing SIGTERM/SIGINT on so it can flush its cassettes;
    a child ended by a signal exits 128 + signal, as a shell reports it.

    ``hold``: also wait (up to :data:`HOLD_TIMEOUT` seconds) for the processes writing the
    command's cassettes (see :mod:`~timetracer_otel.exporters.sink`), which finish on their
    own when the command dies without flushing (uvicorn re-raises SIGTERM after its shutdown:
    no atexit runs). They hold one end of a pipe this process reads to its end, and write a
    mark on it for each failure that may have lost a cassette.

    Returns the exit code and the number of those failures."""
    if not cmd:
        raise click.UsageError("give the command to run after --, e.g. -- python app.py")
    read_end = write_end = None
    if hold:
        read_end, write_end = os.pipe()
        env = {**env, HOLD_FD_ENV: str(write_end)}
    try:
        child = subprocess.Popen(_instrument_command(cmd, env), env=env,
                                 pass_fds=() if write_end is None else (write_end,))
    finally:
        if write_end is not None:
            os.close(write_end)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    failures = 0
    if read_end is not None:
        # The command is gone: Ctrl-C now stops this wait (what is written stays written).
        try:
            deadline = time.monotonic() + HOLD_TIMEOUT
            while (wait := deadline - time.monotonic()) > 0 and select.select([read_end], [], [], wait)[0]:
                data = os.read(read_end, 4096)
                if not data:
                    break
                failures += data.count(FAILURE_MARK)
        except KeyboardInterrupt:
            pass
        finally:
            os.close(read_end)
    return (128 - code if code < 0 else code), failures


# Seconds `record` waits, after the command ends, for its cassette writer processes.
HOLD_TIMEOUT = 60.0


def _exporter_list(current: str | None, add: str) -> str:
    names = [n.strip() for n in (current or "").split(",") if n.strip() and n.strip() != "none"]
    return ",".join([*names, add]) if add not in names else ",".join(names)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--dir", "directory", default=None,
              help="Where cassettes go (default ./cassettes or TIMETRACER_DIR).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Cassette encoding (default msgpack).")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
@_user_errors
def record(directory: str | None, fmt: str | None, cmd: tuple[str, ...]) -> None:
    """Run CMD under opentelemetry-instrument and write a cassette per request or task.

    Example: timetracer-otel record --dir cassettes -- python app.py
    """
    Settings.from_env()  # a bad TIMETRACER_* value stops here, not inside the child
    env = dict(os.environ)
    directory = directory or env.get("TIMETRACER_DIR") or "./cassettes"
    storage = storage_for(directory)
    storage.check()
    before = set(_listing(directory))
    env.update(
        TIMETRACER_MODE="record",
        # Absolute: an app that changes directory (gunicorn --chdir, a daemon) writes here.
        TIMETRACER_DIR=_absolute(directory),
        OTEL_TRACES_EXPORTER=_exporter_list(env.get("OTEL_TRACES_EXPORTER"), "timetracer"),
    )
    env.setdefault("OTEL_METRICS_EXPORTER", "none")
    env.setdefault("OTEL_LOGS_EXPORTER", "none")
    if fmt:
        env["TIMETRACER_FORMAT"] = fmt
    code, failures = _run(cmd, env, hold=True)
    new = [p for p in _listing(directory) if p not in before]
    click.echo(f"timetracer-otel: recorded {len(new)} cassette(s) in {printable(directory)}",
               err=True)
    for p in new[:20]:
        click.echo(f"  {printable(p)}", err=True)
    if failures:
        # Cassettes may be missing: a job recording fixtures must not pass on as if none were.
        click.echo(f"timetracer-otel: the cassette writer failed {failures} time(s), so cassettes "
                   f"may be missing from {printable(directory)}; see its warnings above (a full "
                   "disk?).", err=True)
        sys.exit(code or 2)
    sys.exit(code)


def _absolute(location: str) -> str:
    """A local path made absolute, for a child that may change its working directory."""
    return location if is_remote(location) else os.path.abspath(location)


def _listing(directory: str) -> list[str]:
    """The cassettes in ``directory`` now, to tell the new ones (none when it holds none)."""
    try:
        if is_remote(directory):
            return source_names(directory)
        if not os.path.isdir(directory):  # (not yet, or no longer, a directory)
            return []
        # (an unreadable subdirectory holds none this command wrote: not said here)
        return [str(p) for p in find_cassettes(directory, unreadable=[])]
    except TimetracerError:  # an empty prefix
        return []


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("path", required=False)
@click.option("--cassette", "cassette", default=None, help="Cassette file or directory to replay from.")
@click.option("--on-miss", type=click.Choice([m.value for m in OnMiss]), default=None,
              help="What an unrecorded call does (default error).")
@click.option("--strict", is_flag=True, help="Exact keys only: no shape matching.")
@click.option("--live", default=None, help="Comma-separated libraries that stay live (hybrid replay).")
@click.option("--asgi", "asgi_app", default=None,
              help="MODULE:APP to replay the recorded inbound request into.")
@click.option("--celery", "celery_app", default=None,
              help="MODULE:APP (a Celery app) to run the recorded task runs again with.")
@click.option("--header", "headers", multiple=True, metavar="'NAME: value'",
              help="With --asgi: a request header to send instead of the recorded one (the real "
                   "value of one stored redacted, an Authorization); repeatable.")
@click.option("--lifespan", type=click.Choice(["auto", "on", "off"]), default=None,
              help="With --asgi: run the app's lifespan startup before the requests and its "
                   "shutdown after, answered from the recorded startup (default auto: when the "
                   "app takes part in the lifespan protocol).")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@_user_errors
def replay(
    path: str | None,
    cassette: str | None,
    on_miss: str | None,
    strict: bool,
    live: str | None,
    asgi_app: str | None,
    celery_app: str | None,
    headers: tuple[str, ...],
    lifespan: str | None,
    cmd: tuple[str, ...],
) -> None:
    """Run CMD with every dependency answered from the cassette, or re-run a recorded inbound
    request against an ASGI app, or recorded task runs with a Celery app.

    Examples: timetracer-otel replay --cassette cassettes -- python app.py;
    timetracer-otel replay cassettes/x.msgpack --asgi app:app;
    timetracer-otel replay cassettes --celery shop.worker:app
    """
    if cassette is not None and path is not None:
        cmd = (path, *cmd)  # with --cassette, every word after -- belongs to the command
        path = None
    source = cassette or path
    if source is None:
        raise click.UsageError("give the cassette: --cassette PATH (or PATH with --asgi/--celery)")
    if asgi_app is not None and celery_app is not None:
        raise click.UsageError("give --asgi or --celery, not both")
    if headers and asgi_app is None:
        raise click.UsageError("--header goes with --asgi (the recorded request it changes)")
    if lifespan is not None and asgi_app is None:
        raise click.UsageError("--lifespan goes with --asgi (the app whose lifespan it runs)")
    given = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name.strip() != name.strip().split()[0]:
            # (not echoed: it may hold the secret it carries)
            raise click.UsageError("--header takes 'NAME: value': a header name, a colon, its value")
        if _HEADER_CONTROL.search(h):
            # A CR or LF would end the header and start another: one header per --header.
            raise click.UsageError("--header: a header holds no line breaks or other control "
                                   "characters; give each header its own --header")
        try:
            (name + value).encode("latin-1")
        except UnicodeEncodeError:
            raise click.UsageError("--header: an HTTP header holds latin-1 text only; "
                                   "percent- or base64-encode the value as the app expects") from None
        given.append((name.strip(), value.strip()))
    settings = Settings.from_env()
    live_names = library_names(live, "--live") if live else settings.live
    if celery_app is not None or asgi_app is not None:
        # In this process: the options, else the environment's TIMETRACER_* as in the child.
        miss, strictly = on_miss or settings.on_miss.value, strict or settings.strict
        if celery_app is not None:
            from timetracer_otel.tasks import replay_task_command

            sys.exit(replay_task_command(source, celery_app, on_miss=miss, strict=strictly,
                                         live=live_names))
        from timetracer_otel.inbound import replay_asgi_command  # type: ignore[import-not-found,import-untyped,unused-ignore]

        sys.exit(replay_asgi_command(source, str(asgi_app), on_miss=miss, strict=strictly,
                                     live=live_names, headers=given,
                                     lifespan=lifespan or "auto"))
    # A miss fails the replay when it is an error; passthrough and record let it go live.
    misses_fail = (OnMiss(on_miss) if on_miss else settings.on_miss) is OnMiss.ERROR
    if not is_remote(source) and not find_cassettes(source):  # (s3: no objects raises)
        raise CassetteError(f"{source} holds no cassettes (.msgpack or .json files); check the path.")
    ReplayIndex.from_paths([source])  # fail here, with exit code 2, if it cannot be read
    env = dict(os.environ)
    # Every process of the command writes its own report in here (see _read_report).
    report_dir = tempfile.mkdtemp(prefix="timetracer-report-")
    report_path = os.path.join(report_dir, "report")
    env.update(
        TIMETRACER_MODE="replay",
        # Absolute: an app that changes directory still finds (and, on_miss=record, adds to) it.
        TIMETRACER_CASSETTE=_absolute(source),
        TIMETRACER_REPORT=report_path,
    )
    env.setdefault("OTEL_TRACES_EXPORTER", "none")
    env.setdefault("OTEL_METRICS_EXPORTER", "none")
    env.setdefault("OTEL_LOGS_EXPORTER", "none")
    if on_miss:
        env["TIMETRACER_ON_MISS"] = on_miss
    if strict:
        env["TIMETRACER_STRICT"] = "1"
    if live:
        env["TIMETRACER_LIVE_PLUGINS"] = live
    try:
        code, _ = _run(cmd, env)
        report, lost = _read_report(report_path)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
    if report is not None:
        click.echo(f"timetracer-otel: {printable_lines(report.render())}", err=True)
        if code == 0 and report.failed(misses_fail):  # (whatever the app made of the error)
            code = 1
        if report.unkept:  # calls recorded live and lost: as `record` does for cassettes
            code = code or 2
    for why in lost:  # a process's calls that cannot be counted: the replay is not checked
        click.echo(f"timetracer-otel: {printable(why)}", err=True)
        code = code or 2
    sys.exit(code)


_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # (a tab may be in a value)


def printable_lines(text: str) -> str:
    """:func:`printable` for each line of ``text``, keeping its line breaks."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _read_report(path: str) -> tuple[ReplayReport | None, list[str]]:
    """The replay reports of every process of the command, added up (None when no process
    wrote one), and why any could not be read.

    Each process wrote its own ``<path>.<pid>-<random>`` (see
    :func:`~timetracer_otel.autoinstrument._write_report`). Calls answered, approximated,
    missed, refused or not kept add up; a recorded call is unused when no process used it
    (each process loaded all of them)."""
    directory, base = os.path.split(path)
    files = []
    for entry in os.scandir(directory):
        if entry.name.startswith(base + ".") and not entry.name.endswith(".tmp"):
            files.append((entry.stat().st_mtime_ns, entry.name, entry.path))
    reports: list[ReplayReport] = []
    lost: list[str] = []
    for _, _, file in sorted(files):  # in the order the processes ended
        try:
            reports.append(msgspec.json.decode(Path(file).read_bytes(), type=ReplayReport))
        except (OSError, msgspec.DecodeError) as exc:
            lost.append(f"the replay report of one process could not be read ({exc}), so its "
                        "calls are not counted; replay again.")
    if not reports:
        return None, lost
    total = ReplayReport(unused=list(reports[0].unused))
    unused_by_all = Counter(tuple(u) for u in reports[0].unused)
    for r in reports:
        total.exact += r.exact
        total.shape_matches.extend(r.shape_matches)
        total.misses.extend(r.misses)
        total.unkept.extend(r.unkept)
        total.stranded.extend(r.stranded)
        total.unsupported.extend(r.unsupported)
        unused_by_all &= Counter(tuple(u) for u in r.unused)
    kept = []
    for label, src in total.unused:  # (in the first report's order)
        if unused_by_all[(label, src)] > 0:
            unused_by_all[(label, src)] -= 1
            kept.append((label, src))
    total.unused = kept
    return total, lost


@main.command("ls")
@click.argument("directory", default="./cassettes")
@_user_errors
def ls(directory: str) -> None:
    """List the cassettes below DIRECTORY with their calls and completeness.

    A cassette that cannot be read is named on its own line and makes the exit code 2,
    after the others are listed."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("cassette", "created", "spans", "calls", "libraries", "complete", "bytes")
    problems: list[str] = []  # subdirectories that cannot be read, then cassettes
    if is_remote(directory):
        names = source_names(directory)
    else:
        names = [str(p) for p in find_cassettes(directory, unreadable=problems)]
    the_one_file = not problems and len(names) == 1 and names[0] in (directory, str(Path(directory)))
    for name in names:  # one at a time: never more than one cassette in memory
        try:
            table.add_row(*_ls_row(name))
        except TimetracerError as exc:
            if the_one_file:  # the one file asked for: its error is the answer
                raise
            problems.append(str(exc))
            table.add_row(Text(printable(name)), "-", "-", "-", "-",
                          Text("unreadable", style="red"), "-")
    with _writing_output():
        Console().print(table)
    for problem in problems:
        click.echo(f"timetracer-otel: {printable(without_passwords(problem))}", err=True)
    if problems:
        sys.exit(2)


def _ls_row(name: str) -> list[Any]:
    """The ``ls`` row of one cassette (read, decoded and let go here)."""
    from rich.text import Text

    data = read_source(name)  # (a file past the size limit: refused unread)
    c = loads(data, name)
    libs = sorted({s.library for s in c.interactions if s.library})
    # Names, dates and libraries are the cassette's text, never markup nor terminal codes.
    return [
        Text(printable(name)), Text(printable(c.created[:19])), str(len(c.spans)),
        str(len(c.interactions)), Text(printable(",".join(libs))),
        "yes" if c.complete else Text("no", style="yellow"), str(len(data)),
    ]


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def _text(value: object) -> str:
    """Cassette text for rich markup: shown as it is, never markup, never terminal codes."""
    from rich.markup import escape

    return escape(printable(str(value)))


def _span_line(span: SpanRecord, t0: int) -> str:
    offset = _ms(span.start_ns - t0)
    lib = f"[cyan]{_text(span.library)}[/] " if span.library else ""
    label = _text(span.label or span.name)
    status = ""
    if span.error is not None:
        # (a dict with a type when this package wrote it; anything, from another writer)
        kind = span.error.get("type", "?") if isinstance(span.error, dict) else "?"
        status = f" [red]raised {_text(kind)}[/]"
    elif span.status == "ERROR":
        status = " [red]error[/]"
    trunc = " [yellow](truncated)[/]" if span.truncated else ""
    return f"{lib}{label}  [dim]+{offset} {_ms(span.duration_ns)}[/]{status}{trunc}"


# In JSON output, the characters a terminal would act on that JSON leaves raw (DEL, C1
# controls, bidirectional overrides, line separators): as \u escapes, the same JSON.
_JSON_RAW_UNPRINTABLE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the whole cassette as JSON.")
@_user_errors
def show(path: str, as_json: bool) -> None:
    """Show a cassette as a tree of spans with timings and library."""
    cassette = load_one(path)  # a file or an s3:// object
    if as_json:
        text = msgspec.json.format(msgspec.json.encode(cassette), indent=2).decode()
        text = _JSON_RAW_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
        with _writing_output():
            click.echo(text)
        return
    from rich.console import Console
    from rich.tree import Tree

    spans = sorted(cassette.spans, key=lambda s: s.start_ns)
    t0 = spans[0].start_ns if spans else 0
    header = (
        f"[bold]{_text(cassette.name)}[/] {_text(cassette.created[:19])} "
        f"{len(spans)} spans, {len(cassette.interactions)} calls"
        + ("" if cassette.complete else " [yellow]incomplete[/]")
    )
    tree = Tree(header)
    ids = {s.span_id for s in spans}
    nodes: dict[str, Tree] = {}
    for span in spans:
        parent = nodes.get(span.parent_id or "") if span.parent_id in ids else None
        nodes[span.span_id] = (parent or tree).add(_span_line(span, t0))
    with _writing_output():
        Console().print(tree)


@main.command()
@click.argument("source")
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output encoding (default: from DEST's suffix).")
@_user_errors
def convert(source: str, dest: str, fmt: str | None) -> None:
    """Re-encode a cassette (msgpack <-> JSON), keeping every value and type."""
    cassette: Cassette = load_cassette(source)
    out = save_cassette(cassette, dest, fmt)  # type: ignore[arg-type]
    with _writing_output():
        click.echo(f"wrote {printable(str(out))}")


@main.command()
@click.argument("a")
@click.argument("b")
@_user_errors
def diff(a: str, b: str) -> None:
    """Compare two cassettes of the same endpoint: request, response and dependency calls
    (aligned by key). Exit 1 when they differ."""
    from timetracer_otel.inbound import diff_command  # type: ignore[import-not-found,import-untyped,unused-ignore]

    with _writing_output():
        code = diff_command(a, b)
    sys.exit(code)


@main.command()
@click.option("--listen", default="127.0.0.1:4318", show_default=True, help="HOST:PORT for OTLP/HTTP.")
@click.option("--dir", "directory", default=None, help="Where cassettes go (local dir or s3://bucket/prefix).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="Cassette encoding.")
@click.option("--quiet-period", type=float, default=2.0, show_default=True,
              help="Seconds without new spans before a rooted trace is written.")
@_user_errors
def collect(listen: str, directory: str | None, fmt: str | None, quiet_period: float) -> None:
    """Receive OTLP/HTTP traces (from a Collector) and write the same cassettes in-process
    recording writes."""
    from timetracer_otel.exporters.otlp import collect_command  # type: ignore[import-not-found,import-untyped,unused-ignore]

    sys.exit(collect_command(listen, directory, fmt, quiet_period))


@main.command("html")
@click.argument("path")
@click.option("-o", "--output", "output", required=True, help="The HTML file to write.")
@_user_errors
def html_command(path: str, output: str) -> None:
    """Write a cassette as a static HTML page (no script; every value escaped).

    Example: timetracer-otel html cassettes/x.msgpack -o x.html
    """
    from timetracer_otel.cassette import atomic_write
    from timetracer_otel.html import render

    out = atomic_write(output, render(load_cassette(path)).encode())
    with _writing_output():
        click.echo(f"wrote {printable(str(out))}")


if __name__ == "__main__":
    main()
