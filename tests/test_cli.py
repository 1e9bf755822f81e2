"""The CLI: record/replay wrappers through opentelemetry-instrument, and the cassette tools.

Bad input is exit code 2 with one line and no traceback; replay failures are exit code 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

import timetracer_otel
from tests.conftest import ServerThread
from tests.upstream_app import app
from timetracer_otel.cassette import find_cassettes, load_cassette, save_cassette

CLI = [sys.executable, "-m", "timetracer_otel.cli"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)


SCRIPT = textwrap.dedent(
    """
    import os, sys, httpx
    base = os.environ["UPSTREAM_URL"]
    r = httpx.get(base + "/items", params={"page": sys.argv[1]})
    print(r.status_code, r.json()["page"], type(r.content).__name__)
    try:
        httpx.get(base + "/items", params={"page": "extra"}) if len(sys.argv) > 2 else None
    except Exception as exc:  # an app that swallows errors must not hide a replay miss
        print("swallowed", type(exc).__name__)
    """
)


def record_job(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """The job (one call: GET /items?page=1) recorded through the CLI into ``tmp / "c"``
    against an upstream stopped afterwards: the cassettes, the script, its environment."""
    server = ServerThread(app).start()
    script = tmp / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, UPSTREAM_URL=server.url)
    try:
        out = cli("record", "--dir", str(tmp / "c"), "--", sys.executable, str(script), "1", env=env)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "200 1 bytes\n"
    assert "recorded 1 cassette(s)" in out.stderr
    return tmp / "c", script, env


@pytest.fixture(scope="module")
def recorded_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """The job recorded through the CLI once for the module (each recording is a few seconds
    of subprocesses)."""
    return record_job(tmp_path_factory.mktemp("cli-recorded"))


@pytest.fixture
def recorded(recorded_once: tuple[Path, Path, dict[str, str]],
             tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A copy of :func:`recorded_once`'s cassettes and script of the test's own."""
    cassettes, script, env = recorded_once
    shutil.copytree(cassettes, tmp_path / "c")
    shutil.copy(script, tmp_path / "job.py")
    return tmp_path / "c", tmp_path / "job.py", env


Recorded = tuple[Path, Path, dict[str, str]]


def test_record_then_replay_offline_gives_the_same_output(recorded: Recorded) -> None:
    cassettes, script, env = recorded
    out = cli("replay", "--cassette", str(cassettes), "--", sys.executable, str(script), "1", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "200 1 bytes\n"
    assert "1 exact, 0 by shape, 0 missed" in out.stderr


def test_a_swallowed_replay_miss_still_fails_the_replay(recorded: tuple[Path, Path, dict[str, str]]) -> None:
    cassettes, script, env = recorded
    out = cli("replay", "--cassette", str(cassettes), "--strict", "--", sys.executable, str(script), "1", "x",
              env=env)
    assert "swallowed ReplayMissError" in out.stdout
    assert out.returncode == 1
    assert "1 missed" in out.stderr and "page=extra" in out.stderr


def test_show_ls_and_convert(recorded: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    cassettes, script, env = recorded
    [path] = find_cassettes(cassettes)
    shown = cli("show", str(path))
    assert shown.returncode == 0 and "httpx" in shown.stdout and "/items?page=1" in shown.stdout
    listed = cli("ls", str(cassettes))
    assert listed.returncode == 0 and "httpx" in listed.stdout
    out_json = tmp_path / "c.json"
    converted = cli("convert", str(path), str(out_json))
    assert converted.returncode == 0, converted.stderr
    a, b = load_cassette(path), load_cassette(out_json)
    assert out_json.read_bytes().lstrip().startswith(b"{")
    assert [s.key for s in a.spans] == [s.key for s in b.spans]
    # The converted cassette still answers the job offline, with the same bytes.
    replayed = cli("replay", "--cassette", str(out_json), "--", sys.executable, str(script), "1", env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == "200 1 bytes\n" and "1 exact, 0 by shape, 0 missed" in replayed.stderr
    as_json = cli("show", "--json", str(path))
    assert msgspec.json.decode(as_json.stdout)["spans"][0]["library"] == "httpx"


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("command", ["show", "convert", "replay", "ls"])
def test_bad_cassettes_are_one_line_exit_2(command: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.msgpack"
    corrupt.write_bytes(b"\x85\xa7version\x01garbage")
    future = tmp_path / "future.json"
    future.write_bytes(msgspec.json.encode({"version": 99, "id": "x", "name": "x", "created": "x"}))
    missing = tmp_path / "missing.msgpack"

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        if command == "show":
            return cli("show", str(path))
        if command == "convert":
            return cli("convert", str(path), str(tmp_path / "out.json"))
        if command == "ls":  # one file named: its error is the answer, not a table row
            return cli("ls", str(path))
        return cli("replay", "--cassette", str(path), "--", sys.executable, "-c", "print('never runs')")

    _one_line_exit_2(run(corrupt), "corrupt.msgpack", "corrupt")
    _one_line_exit_2(run(future), "version 99", "upgrade")
    _one_line_exit_2(run(missing), "missing.msgpack")
    fifo = tmp_path / "fifo.msgpack"  # opening it for reading used to wait for a writer forever
    os.mkfifo(fifo)
    _one_line_exit_2(run(fifo), "fifo.msgpack is not a regular file")
    assert not (tmp_path / "out.json").exists()  # nothing half-written


def test_unwritable_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("record", "--dir", str(blocker / "cassettes"), "--", sys.executable, "-c", "print(1)")
    _one_line_exit_2(result, "cannot write cassettes", "writable directory")


def test_unknown_environment_values_are_one_line_exit_2(tmp_path: Path) -> None:
    env = dict(os.environ, TIMETRACER_ON_MISS="sometimes")
    result = cli("record", "--dir", str(tmp_path), "--", sys.executable, "-c", "print(1)", env=env)
    _one_line_exit_2(
        result, "TIMETRACER_ON_MISS='sometimes' is not valid; use one of: error, passthrough, record.")


def test_a_malformed_encryption_key_stops_recording_before_the_program_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    env = dict(os.environ, TIMETRACER_ENCRYPTION_KEY="short")
    program = f"open({str(marker)!r}, 'w').write('x')"
    result = cli("record", "--dir", str(tmp_path / "c"), "--", sys.executable, "-c", program, env=env)
    assert result.returncode == 2 and "TIMETRACER_ENCRYPTION_KEY" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()  # the program never started
    # Through opentelemetry-instrument directly, too.
    exe = Path(sys.executable).parent / "opentelemetry-instrument"
    direct = subprocess.run([str(exe), sys.executable, "-c", program], capture_output=True, text=True,
                            env=dict(env, TIMETRACER_MODE="record", TIMETRACER_DIR=str(tmp_path / "d")))
    assert direct.returncode == 2 and "TIMETRACER_ENCRYPTION_KEY" in direct.stderr
    assert not marker.exists()


def test_ls_prints_cassette_text_as_text_not_markup(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, _, _ = recorded
    [path] = find_cassettes(cassettes)
    odd = tmp_path / "odd" / "[" / "red] and [bold]x.msgpack"  # the path reads '[/red] and [bold]x'
    odd.parent.mkdir(parents=True)
    odd.write_bytes(path.read_bytes())
    listed = subprocess.run([*CLI, "ls", str(tmp_path / "odd")], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, COLUMNS="300"))
    assert listed.returncode == 0, listed.stderr
    assert "[/red] and [bold]x.msgpack" in listed.stdout


def test_a_child_ended_by_a_signal_exits_128_plus_the_signal(tmp_path: Path) -> None:
    kill_self = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    result = cli("record", "--dir", str(tmp_path), "--", sys.executable, "-c", kill_self)
    assert result.returncode == 128 + 15


def test_record_waits_for_the_cassettes_of_an_app_killed_before_it_flushed(
    serve: Any, tmp_path: Path
) -> None:
    # SIGKILL (or uvicorn re-raising SIGTERM) ends the app with no atexit, no flush: the
    # writer process finishes the trace it was sent, and `record` counts it once it is done.
    server = serve(app)
    script = textwrap.dedent("""
        import os, signal, time, httpx
        httpx.get(os.environ["UPSTREAM_URL"] + "/items", params={"page": "1"})
        time.sleep(1.0)  # the batch span processor's 50 ms, then the writer's
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = dict(os.environ, UPSTREAM_URL=server.url, OTEL_BSP_SCHEDULE_DELAY="50")
    result = cli("record", "--dir", str(tmp_path), "--", sys.executable, "-c", script, env=env)
    assert result.returncode == 128 + 9
    assert "recorded 1 cassette(s)" in result.stderr, result.stderr
    [path] = find_cassettes(tmp_path)
    [span] = load_cassette(path).spans
    assert span.library == "httpx" and span.response is not None and span.response["status"] == 200


def test_a_script_stopped_by_sigterm_keeps_what_it_recorded(serve: Any, tmp_path: Path) -> None:
    """`timeout`, `docker stop`: a SIGTERM the script leaves to Python's default skips atexit;
    its calls (held by the batch span processor for up to 5 s, then in the script's own
    cassette until it ends) are written first, and it still ends by the signal."""
    server = serve(app)
    script = textwrap.dedent("""
        import os, sys, time, httpx
        for page in (1, 2):
            httpx.get(os.environ["UPSTREAM_URL"] + "/items", params={"page": str(page)})
        print("ready", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, UPSTREAM_URL=server.url)
    proc = subprocess.Popen([*CLI, "record", "--dir", str(tmp_path), "--", sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)  # to the CLI, which passes it on to the script
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + 15, stderr
    assert "recorded 1 cassette(s)" in stderr, stderr
    [path] = find_cassettes(tmp_path)
    calls = load_cassette(path).interactions
    pages = [(c.library, c.request["url"].rsplit("=", 1)[1]) for c in calls]
    assert pages == [("httpx", "1"), ("httpx", "2")]
    server.stop()
    with timetracer_otel.replay(path, strict=True) as rep:
        import httpx

        got = [httpx.get(server.url + "/items", params={"page": str(p)}).status_code for p in (1, 2)]
    assert got == [200, 200]
    assert rep.report.exact == 2


@pytest.mark.parametrize("command", ["record", "replay"])
def test_a_command_that_does_not_exist_is_one_line_exit_2(
    command: str, recorded: Recorded, tmp_path: Path
) -> None:
    cassettes, _, _ = recorded
    where = ["--dir", str(tmp_path / "out")] if command == "record" else ["--cassette", str(cassettes)]
    result = cli(command, *where, "--", str(tmp_path / "no-such-program"), "arg")
    _one_line_exit_2(result, "no-such-program: command not found")


def test_convert_refuses_special_files_and_suffixes_it_cannot_read(
    recorded: Recorded, tmp_path: Path
) -> None:
    cassettes, _, _ = recorded
    [path] = find_cassettes(cassettes)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    target = tmp_path / "target.json"
    target.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    for dest in (fifo, link, tmp_path):  # the rename would replace each of them
        _one_line_exit_2(cli("convert", str(path), str(dest)), "is not a regular file")
    assert fifo.is_fifo() and link.is_symlink() and target.read_text() == "kept"
    _one_line_exit_2(cli("convert", str(path), str(tmp_path / "out.yaml")), "'.yaml'", ".json or .msgpack")
    assert not (tmp_path / "out.yaml").exists()
    upper = tmp_path / "OUT.JSON"
    assert cli("convert", str(path), str(upper)).returncode == 0
    assert upper.read_bytes().lstrip().startswith(b"{")
    explicit = tmp_path / "out.yaml"
    assert cli("convert", "--format", "json", str(path), str(explicit)).returncode == 0
    assert load_cassette(explicit).interactions[0].key == load_cassette(path).interactions[0].key



def test_bad_redaction_rules_stop_recording_but_not_reading(recorded: Recorded, tmp_path: Path) -> None:
    # The rules were read on import: every command, --help included, printed a traceback.
    cassettes, script, _ = recorded
    [path] = find_cassettes(cassettes)
    env = dict(os.environ, TIMETRACER_REDACT="bogus")
    assert cli("--help", env=env).returncode == 0
    shown = cli("show", str(path), env=env)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr
    for command in ("record", "replay"):
        where = ["--dir", str(tmp_path / "out")] if command == "record" else ["--cassette", str(cassettes)]
        result = cli(command, *where, "--", sys.executable, str(script), "1", env=env)
        _one_line_exit_2(result, "TIMETRACER_REDACT rule 'bogus' has no kind")
    assert not (tmp_path / "out").exists()


def test_record_fails_when_its_cassettes_could_not_be_written(serve: Any, tmp_path: Path) -> None:
    # The directory is checked at the start; here the app replaces it with a file before its
    # cassette is written (as a disk filling up would make the write fail): exit 0 said all
    # was well.
    server = serve(app)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, shutil, httpx
        httpx.get(os.environ["UPSTREAM_URL"] + "/items")
        shutil.rmtree(os.environ["TIMETRACER_DIR"])
        open(os.environ["TIMETRACER_DIR"], "w").close()
        print("app done")
    """))
    env = dict(os.environ, UPSTREAM_URL=server.url)
    out = cli("record", "--dir", str(tmp_path / "c"), "--", sys.executable, str(script), env=env)
    assert out.stdout == "app done\n"
    assert out.returncode == 2, out.stderr
    assert "recorded 0 cassette(s)" in out.stderr
    assert "the cassette writer failed 1 time(s), so cassettes may be missing" in out.stderr


def test_replay_refuses_an_empty_directory_and_misspelt_libraries(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, script, env = recorded
    run = [sys.executable, str(script), "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(cli("replay", "--cassette", str(empty), "--", *run, env=env), "holds no cassettes")
    _one_line_exit_2(cli("replay", "--cassette", str(cassettes), "--live", "htpx", "--", *run, env=env),
                     "--live names 'htpx'", "httpx")
    mock_typo = dict(env, TIMETRACER_MOCK_PLUGINS="httpx,reqests")
    _one_line_exit_2(cli("replay", "--cassette", str(cassettes), "--", *run, env=mock_typo),
                     "TIMETRACER_MOCK_PLUGINS names 'reqests'")
    ok = cli("replay", "--cassette", str(cassettes), "--live", "requests", "--", *run, env=env)
    assert ok.returncode == 0 and ok.stdout == "200 1 bytes\n", ok.stderr


def test_a_cassette_and_its_json_conversion_have_no_differences(recorded: Recorded, tmp_path: Path) -> None:
    # JSON stores an HTTP body as base64 text: diff called every call 'different outcome'.
    cassettes, _, _ = recorded
    [path] = find_cassettes(cassettes)
    as_json = tmp_path / "c.json"
    assert cli("convert", str(path), str(as_json)).returncode == 0
    same = cli("diff", str(path), str(as_json))
    assert same.returncode == 0 and "no differences" in same.stdout, same.stdout
    changed = load_cassette(as_json)
    [call] = changed.interactions
    call.response["chunks"] = [b"another body"]
    save_cassette(changed, tmp_path / "changed.json")
    differ = cli("diff", str(path), str(tmp_path / "changed.json"))
    assert differ.returncode == 1 and "different outcome" in differ.stdout, differ.stdout


def test_replay_on_miss_record_keeps_the_calls_it_lacked(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, UPSTREAM_URL=server.url)
    cassettes = tmp_path / "c"
    job = [sys.executable, str(script), "1"]
    assert cli("record", "--dir", str(cassettes), "--", *job, env=env).returncode == 0
    # The second call (page=extra) has no recording: it goes live and joins the directory.
    grown = cli("replay", "--cassette", str(cassettes), "--on-miss", "record", "--", *job, "x", env=env)
    assert grown.returncode == 0, grown.stderr
    assert grown.stdout == "200 1 bytes\n"
    [added] = [p for p in find_cassettes(cassettes) if p.name.startswith("appended-")]
    assert f"1 call(s) the cassette lacked were recorded into {added}" in grown.stderr
    assert [i.label for i in load_cassette(added).interactions] == [f"GET {server.url}/items?page=extra"]
    server.stop()
    offline = cli("replay", "--cassette", str(cassettes), "--strict", "--", *job, "x", env=env)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == "200 1 bytes\n"  # nothing swallowed: both calls answered
    assert "2 exact, 0 by shape, 0 missed, 0 recorded but unused" in offline.stderr


def test_replay_on_miss_record_fails_when_it_cannot_keep_the_calls(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT + "\nimport pathlib; pathlib.Path(os.environ['DOOMED']).unlink()\n")
    cassettes = tmp_path / "c"
    env = dict(os.environ, UPSTREAM_URL=server.url, DOOMED=str(tmp_path / "spare"))
    (tmp_path / "spare").touch()
    assert cli("record", "--dir", str(cassettes), "--", sys.executable, str(script), "1",
               env=env).returncode == 0
    [cassette] = find_cassettes(cassettes)
    link = tmp_path / "link.msgpack"
    link.symlink_to(cassette)  # kept through a link: the cassette itself gets the call
    (tmp_path / "spare").touch()
    kept = cli("replay", "--cassette", str(link), "--on-miss", "record", "--", sys.executable,
               str(script), "1", "x", env=env)
    assert kept.returncode == 0, kept.stderr
    assert link.is_symlink() and len(load_cassette(cassette).interactions) == 2
    # The app deletes the cassette it replays: the call it recorded live has nowhere to go.
    lost = cli("replay", "--cassette", str(cassette), "--on-miss", "record", "--strict", "--",
               sys.executable, str(script), "2", env=dict(env, DOOMED=str(cassette)))
    assert lost.returncode == 2, lost.stderr
    assert "not kept: " in lost.stderr and "is not a cassette file or directory" in lost.stderr
    assert "Traceback" not in lost.stderr
