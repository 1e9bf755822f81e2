"""``timetracer-otel``: record and replay commands, and tools to look at cassettes.

Exit codes: 0 ok; 1 differences or replay failures; 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
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
from timetracer_otel.exporters.storage import load_one, read_sources, source_names, storage_for
from timetracer_otel.index import ReplayIndex, ReplayReport

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Our own errors become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TimetracerError as exc:
            click.echo(f"timetracer-otel: {without_passwords(str(exc))}", err=True)
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
        TIMETRACER_DIR=str(directory),
        OTEL_TRACES_EXPORTER=_exporter_list(env.get("OTEL_TRACES_EXPORTER"), "timetracer"),
    )
    env.setdefault("OTEL_METRICS_EXPORTER", "none")
    env.setdefault("OTEL_LOGS_EXPORTER", "none")
    if fmt:
        env["TIMETRACER_FORMAT"] = fmt
    code, failures = _run(cmd, env, hold=True)
    new = [p for p in _listing(directory) if p not in before]
    click.echo(f"timetracer-otel: recorded {len(new)} cassette(s) in {directory}", err=True)
    for p in new[:20]:
        click.echo(f"  {p}", err=True)
    if failures:
        # Cassettes may be missing: a job recording fixtures must not pass on as if none were.
        click.echo(f"timetracer-otel: the cassette writer failed {failures} time(s), so cassettes "
                   f"may be missing from {directory}; see its warnings above (a full disk?).", err=True)
        sys.exit(code or 2)
    sys.exit(code)


def _listing(directory: str) -> list[str]:
    if str(directory).startswith("s3://"):
        try:
            return source_names(directory)
        except TimetracerError:  # an empty prefix
            return []
    if not Path(directory).is_dir():
        return []
    return [str(p) for p in find_cassettes(directory)]


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
    if not str(source).startswith("s3://") and not find_cassettes(source):  # (s3: no objects raises)
        raise CassetteError(f"{source} holds no cassettes (.msgpack or .json files); check the path.")
    ReplayIndex.from_paths([source])  # fail here, with exit code 2, if it cannot be read
    env = dict(os.environ)
    fd, report_path = tempfile.mkstemp(prefix="timetracer-report-", suffix=".json")
    os.close(fd)
    env.update(
        TIMETRACER_MODE="replay",
        TIMETRACER_CASSETTE=str(source),
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
        report = _read_report(report_path)
    finally:
        os.unlink(report_path)
    if report is not None:
        click.echo(f"timetracer-otel: {report.render()}", err=True)
        if code == 0 and report.failed(misses_fail):  # (whatever the app made of the error)
            code = 1
        if report.unkept:  # calls recorded live and lost: as `record` does for cassettes
            code = code or 2
    sys.exit(code)


def _read_report(path: str) -> ReplayReport | None:
    data = Path(path).read_bytes()
    if not data:
        return None
    return msgspec.json.decode(data, type=ReplayReport)


@main.command("ls")
@click.argument("directory", default="./cassettes")
@_user_errors
def ls(directory: str) -> None:
    """List the cassettes below DIRECTORY with their calls and completeness."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table("cassette", "created", "spans", "calls", "libraries", "complete", "bytes")
    sources = read_sources(directory)  # local or s3://
    for name, data in sources:
        try:
            c = loads(data, name)
        except TimetracerError as exc:
            if len(sources) == 1 and name == directory:  # the one file asked for: bad input
                raise
            table.add_row(Text(name), "-", "-", "-", "-", Text(str(exc), style="red"), str(len(data)))
            continue
        libs = sorted({s.library for s in c.interactions if s.library})
        # Names, dates and libraries are the cassette's text, never markup.
        table.add_row(
            Text(name), Text(c.created[:19]), str(len(c.spans)), str(len(c.interactions)),
            Text(",".join(libs)), "yes" if c.complete else Text("no", style="yellow"), str(len(data)),
        )
    Console().print(table)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.2f} ms"


def _span_line(span: SpanRecord, t0: int) -> str:
    from rich.markup import escape

    offset = _ms(span.start_ns - t0)
    lib = f"[cyan]{escape(span.library)}[/] " if span.library else ""
    label = escape(span.label or span.name)
    status = ""
    if span.error is not None:
        status = f" [red]raised {escape(str(span.error.get('type', '?')))}[/]"
    elif span.status == "ERROR":
        status = " [red]error[/]"
    trunc = " [yellow](truncated)[/]" if span.truncated else ""
    return f"{lib}{label}  [dim]+{offset} {_ms(span.duration_ns)}[/]{status}{trunc}"


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the whole cassette as JSON.")
@_user_errors
def show(path: str, as_json: bool) -> None:
    """Show a cassette as a tree of spans with timings and library."""
    cassette = load_one(path)  # a file or an s3:// object
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(cassette), indent=2).decode())
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    spans = sorted(cassette.spans, key=lambda s: s.start_ns)
    t0 = spans[0].start_ns if spans else 0
    header = (
        f"[bold]{escape(cassette.name)}[/] {escape(cassette.created[:19])} "
        f"{len(spans)} spans, {len(cassette.interactions)} calls"
        + ("" if cassette.complete else " [yellow]incomplete[/]")
    )
    tree = Tree(header)
    ids = {s.span_id for s in spans}
    nodes: dict[str, Tree] = {}
    for span in spans:
        parent = nodes.get(span.parent_id or "") if span.parent_id in ids else None
        nodes[span.span_id] = (parent or tree).add(_span_line(span, t0))
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
    click.echo(f"wrote {out}")


@main.command()
@click.argument("a")
@click.argument("b")
@_user_errors
def diff(a: str, b: str) -> None:
    """Compare two cassettes of the same endpoint: request, response and dependency calls
    (aligned by key). Exit 1 when they differ."""
    from timetracer_otel.inbound import diff_command  # type: ignore[import-not-found,import-untyped,unused-ignore]

    sys.exit(diff_command(a, b))


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
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
