"""The CLI against what a user's machine throws at it: several processes replaying at once,
paths it may not look at or name, cassettes written by others (odd types, terminal codes),
and output that cannot be written.

Every case runs the real ``timetracer-otel`` in a subprocess. Bad input is one line and exit
code 2, never a traceback; a replay miss anywhere in the command fails it (exit code 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.test_cli import CLI, SCRIPT, cli, record_job
from tests.upstream_app import app
from timetracer_otel.cassette import Cassette, SpanRecord, find_cassettes, load_cassette, save_cassette

Recorded = tuple[Path, Path, dict[str, str]]


@pytest.fixture(scope="module")
def recorded_once(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """tests/test_cli.py's job (one call: GET /items?page=1) recorded through the CLI once
    for the module."""
    return record_job(tmp_path_factory.mktemp("cli-robustness"))


@pytest.fixture
def recorded(recorded_once: Recorded, tmp_path: Path) -> Recorded:
    """A copy of :func:`recorded_once`'s cassettes and script of the test's own."""
    cassettes, script, env = recorded_once
    shutil.copytree(cassettes, tmp_path / "c")
    shutil.copy(script, tmp_path / "job.py")
    return tmp_path / "c", tmp_path / "job.py", env


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        prefix: tuple[str, ...] = (), stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *CLI, *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd, timeout=120)


def one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# -- every process of a replay counts --------------------------------------------------------

def test_a_miss_in_a_child_process_fails_the_replay(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, script, env = recorded
    parent = tmp_path / "parent.py"  # a job runner: the worker's failure is its own business
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys
        r = subprocess.run([sys.executable, {str(script)!r}, "1", "x"])
        print("worker exit", r.returncode)
    """))
    out = cli("replay", "--cassette", str(cassettes), "--", sys.executable, str(parent), env=env)
    assert "swallowed ReplayMissError" in out.stdout and "worker exit 0" in out.stdout
    assert out.returncode == 1, out.stderr
    # The worker's calls are counted; the recorded call it used is not "unused" because the
    # parent (which made no call) did not use it.
    assert "1 exact, 0 by shape, 1 missed, 0 recorded but unused" in out.stderr, out.stderr
    assert "page=extra" in out.stderr


def test_processes_replaying_at_once_each_count(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, script, env = recorded
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import subprocess, sys
        workers = [subprocess.Popen([sys.executable, {str(script)!r}, "1", "x"]) for _ in range(6)]
        print("exits", [w.wait() for w in workers])
    """))
    out = cli("replay", "--cassette", str(cassettes), "--", sys.executable, str(parent), env=env)
    assert out.returncode == 1, out.stderr
    assert "6 exact, 0 by shape, 6 missed, 0 recorded but unused" in out.stderr, out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_forked_child_reports_only_its_own_calls(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, _, env = recorded
    job = tmp_path / "fork.py"  # the recorded call before the fork, a miss in the child
    job.write_text(textwrap.dedent("""
        import os, sys, httpx
        base = os.environ["UPSTREAM_URL"]
        httpx.get(base + "/items", params={"page": "1"})
        pid = os.fork()
        if pid == 0:
            try:
                httpx.get(base + "/items", params={"page": "extra"})
            except Exception as exc:
                print("child swallowed", type(exc).__name__, flush=True)
            sys.exit(0)
        os.waitpid(pid, 0)
    """))
    out = cli("replay", "--cassette", str(cassettes), "--", sys.executable, str(job), env=env)
    assert "child swallowed ReplayMissError" in out.stdout
    assert out.returncode == 1, out.stderr
    # Not "2 exact": the child does not count the call its parent made before the fork.
    assert "1 exact, 0 by shape, 1 missed, 0 recorded but unused" in out.stderr, out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_miss_in_a_multiprocessing_worker_fails_the_replay(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, _, env = recorded
    job = tmp_path / "pool.py"  # forked workers end with os._exit: no atexit runs in them
    job.write_text(textwrap.dedent("""
        import multiprocessing, os, httpx

        def work(page):
            try:
                httpx.get(os.environ["UPSTREAM_URL"] + "/items", params={"page": page})
            except Exception as exc:
                print("worker swallowed", type(exc).__name__, flush=True)

        if __name__ == "__main__":
            multiprocessing.set_start_method("fork")
            p = multiprocessing.Process(target=work, args=("1",))
            p.start()
            p.join()
            with multiprocessing.Pool(2) as pool:
                pool.map(work, ["extra"])
                pool.close()
                pool.join()
    """))
    out = cli("replay", "--cassette", str(cassettes), "--strict", "--", sys.executable, str(job),
              env=env)
    assert "worker swallowed ReplayMissError" in out.stdout
    assert out.returncode == 1, out.stderr
    assert "1 exact, 0 by shape, 1 missed, 0 recorded but unused" in out.stderr, out.stderr


# -- the child gets absolute paths --------------------------------------------------------------

CHDIR_SCRIPT = textwrap.dedent("""
    import os, sys, httpx
    os.makedirs(sys.argv[1], exist_ok=True)
    os.chdir(sys.argv[1])  # as gunicorn --chdir or a daemon does
    httpx.get(os.environ["UPSTREAM_URL"] + "/items", params={"page": sys.argv[2]})
""")


def test_record_and_replay_give_an_app_that_changes_directory_absolute_paths(
    serve: Any, tmp_path: Path
) -> None:
    server = serve(app)
    (tmp_path / "job.py").write_text(CHDIR_SCRIPT)
    env = dict(os.environ, UPSTREAM_URL=server.url)
    elsewhere = tmp_path / "elsewhere"
    job = [sys.executable, "job.py", str(elsewhere)]
    out = run("record", "--dir", "c", "--", *job, "1", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "recorded 1 cassette(s) in c" in out.stderr, out.stderr
    assert len(find_cassettes(tmp_path / "c")) == 1
    assert not (elsewhere / "c").exists()
    # A call the cassette lacks, recorded live: it joins the cassettes replayed, not elsewhere.
    grown = run("replay", "--cassette", "c", "--on-miss", "record", "--strict", "--", *job, "2",
                env=env, cwd=tmp_path)
    assert grown.returncode == 0, grown.stderr
    [added] = [p for p in find_cassettes(tmp_path / "c") if p.name.startswith("appended-")]
    assert [i.label for i in load_cassette(added).interactions] == [f"GET {server.url}/items?page=2"]
    assert not (elsewhere / "c").exists()


# -- cassette names never hidden --------------------------------------------------------------

def test_a_script_whose_name_starts_with_a_dot_records_a_cassette_ls_and_replay_see(
    serve: Any, tmp_path: Path
) -> None:
    server = serve(app)
    script = tmp_path / ".job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, UPSTREAM_URL=server.url)
    out = cli("record", "--dir", str(tmp_path / "c"), "--", sys.executable, str(script), "1", env=env)
    assert out.returncode == 0, out.stderr
    assert "recorded 1 cassette(s)" in out.stderr, out.stderr
    [path] = find_cassettes(tmp_path / "c")
    assert path.name.startswith("job__")
    server.stop()
    replayed = cli("replay", "--cassette", str(tmp_path / "c"), "--", sys.executable, str(script), "1",
                   env=env)
    assert replayed.returncode == 0 and "1 exact" in replayed.stderr, replayed.stderr


# -- permissions and names too long -------------------------------------------------------------

def _unprivileged(tmp_path: Path) -> tuple[str, ...]:
    """The prefix that runs a command so file permissions apply to it: nothing for a normal
    user; for root, setpriv without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the test is
    skipped where that does not deny access)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be denied")
    caps = "-dac_override,-dac_read_search"
    prefix = (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")
    probe = tmp_path / "probe"
    probe.mkdir(mode=0)
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])",
                                 str(probe)], capture_output=True, text=True, timeout=60)
    finally:
        probe.chmod(0o700)
        probe.rmdir()
    if result.returncode == 0 or "PermissionError" not in result.stderr:
        pytest.skip(f"setpriv does not take away CAP_DAC_OVERRIDE here: {result.stderr.strip()[-200:]}")
    return prefix


@pytest.fixture
def denied(tmp_path: Path) -> Any:
    """``denied(path, mode)``: chmod for the test; every mode is given back afterwards."""
    changed: list[Path] = []

    def chmod(path: Path, mode: int) -> None:
        path.chmod(mode)
        changed.append(path)

    yield chmod
    for path in reversed(changed):
        path.chmod(0o700)


def test_paths_that_cannot_be_looked_at_are_one_line_exit_2(
    recorded: Recorded, tmp_path: Path, denied: Any
) -> None:
    prefix = _unprivileged(tmp_path)
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    noexec = tmp_path / "noexec"  # listable, but nothing in it can be opened
    noexec.mkdir()
    shutil.copy(good, noexec / "a.msgpack")
    denied(noexec, 0o600)
    never = ("--", sys.executable, "-c", "print('never runs')")
    for args in (["ls", str(noexec)], ["ls", str(noexec / "a.msgpack")],
                 ["show", str(noexec / "a.msgpack")],
                 ["replay", "--cassette", str(noexec), *never],
                 ["replay", "--cassette", str(noexec / "a.msgpack"), *never]):
        result = run(*args, prefix=prefix)
        assert "never runs" not in result.stdout
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.strip().splitlines()[-1].endswith(
            ("(Permission denied).", "(Permission denied); check the path and its permissions.")
        ), (args, result.stderr)
    one_line_exit_2(run("convert", str(good), str(noexec / "b.json"), prefix=prefix),
                    "cannot write", "b.json (Permission denied)")
    one_line_exit_2(run("html", str(good), "-o", str(noexec / "b.html"), prefix=prefix),
                    "cannot write", "b.html (Permission denied)")


def test_a_name_too_long_is_one_line_exit_2(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    long = str(tmp_path / ("a" * 300))
    never = ("--", sys.executable, "-c", "print('never runs')")
    one_line_exit_2(run("convert", str(good), long + ".json"), "(File name too long)")
    one_line_exit_2(run("html", str(good), "-o", long + ".html"), "(File name too long)")
    one_line_exit_2(run("ls", long), "(File name too long)")
    one_line_exit_2(run("show", long + ".json"), "(File name too long)")
    one_line_exit_2(run("replay", "--cassette", long, *never), "(File name too long)")


def test_an_unreadable_subdirectory_is_named_never_skipped(
    recorded: Recorded, tmp_path: Path, denied: Any
) -> None:
    prefix = _unprivileged(tmp_path)
    cassettes, script, env = recorded
    [good] = find_cassettes(cassettes)
    mix = tmp_path / "mix"
    (mix / "ok").mkdir(parents=True)
    (mix / "locked").mkdir()
    shutil.copy(good, mix / "ok" / "a.msgpack")
    shutil.copy(good, mix / "locked" / "b.msgpack")
    denied(mix / "locked", 0)
    # ls: what can be read is listed, the directory that cannot is named; exit code 2.
    listed = run("ls", str(mix), prefix=prefix, env=dict(os.environ, COLUMNS="300"))
    assert listed.returncode == 2, listed.stderr
    assert "ok/a.msgpack" in listed.stdout and "httpx" in listed.stdout
    assert listed.stderr.strip() == (f"timetracer-otel: {mix / 'locked'} cannot be read (Permission "
                                     "denied), so the cassettes in it are left out; fix its "
                                     "permissions.")
    # replay: refused before the command runs (its answers may be among those left out).
    job = ("--", sys.executable, str(script), "1")
    one_line_exit_2(run("replay", "--cassette", str(mix), *job, prefix=prefix, env=env),
                    f"{mix / 'locked'} cannot be read (Permission denied)")
    # Nothing readable at all: permission denied, not "holds no cassettes".
    denied(mix / "ok", 0)
    result = run("replay", "--cassette", str(mix), *job, prefix=prefix, env=env)
    one_line_exit_2(result, "(and 1 more) cannot be read (Permission denied)")
    assert "holds no cassettes" not in result.stderr
    denied(mix, 0)
    one_line_exit_2(run("ls", str(mix), prefix=prefix), f"{mix} cannot be read (Permission denied)")


# -- ls: every cassette it can read, each it cannot named ---------------------------------------

def test_ls_lists_what_it_can_read_and_names_each_damaged_cassette(
    recorded: Recorded, tmp_path: Path, denied: Any
) -> None:
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(good, d / "good.msgpack")
    (d / "trunc.msgpack").write_bytes(good.read_bytes()[:40])
    (d / "v2.json").write_bytes(msgspec.json.encode({"version": 2, "id": "x", "name": "x",
                                                     "created": "x"}))
    wide = dict(os.environ, COLUMNS="300")
    listed = run("ls", str(d), env=wide)
    assert listed.returncode == 2, listed.stderr
    assert "good.msgpack" in listed.stdout and "httpx" in listed.stdout
    lines = listed.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in listed.stderr, lines
    assert "trunc.msgpack is corrupt" in lines[0] and "v2.json has cassette version 2" in lines[1]
    # One file that cannot be opened: the rest is still listed.
    prefix = _unprivileged(tmp_path)
    (d / "trunc.msgpack").unlink()
    (d / "v2.json").unlink()
    shutil.copy(good, d / "z.msgpack")
    denied(d / "z.msgpack", 0)
    listed = run("ls", str(d), env=wide, prefix=prefix)
    assert listed.returncode == 2, listed.stderr
    assert "good.msgpack" in listed.stdout and "httpx" in listed.stdout
    assert listed.stderr.strip() == f"timetracer-otel: {d / 'z.msgpack'} cannot be read (Permission denied)."


def test_ls_refuses_a_cassette_over_the_size_limit_unread(recorded: Recorded, tmp_path: Path) -> None:
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(good, d / "a.msgpack")
    size = good.stat().st_size
    env = dict(os.environ, TIMETRACER_MAX_CASSETTE_BYTES=str(size - 1), COLUMNS="300")
    listed = run("ls", str(d), env=env)
    assert listed.returncode == 2, listed.stderr
    assert f"cassette is {size} bytes, over the {size - 1} byte limit" in listed.stderr
    one_line_exit_2(run("ls", str(d / "a.msgpack"), env=env), f"over the {size - 1} byte limit")


# -- cassettes written by others: odd types, terminal codes -------------------------------------

ESC = "\x1b]0;PWNED\x07\x1b[31mRED\x1b[0m\x9b2J\u202e"


def _odd_cassette(path: Path, text: str, error: Any) -> Path:
    root = SpanRecord(trace_id="a" * 32, span_id="b" * 16, name="root" + text, start_ns=1, end_ns=9)
    call = SpanRecord(trace_id="a" * 32, span_id="c" * 16, parent_id="b" * 16, name="GET",
                      kind="CLIENT", start_ns=2, end_ns=5, library="httpx" + text, key="k",
                      label="GET http://h/x" + text, request={"method": "GET"}, error=error)
    cassette = Cassette(id="x", name="name" + text, created="2026-11-30" + text, root="b" * 16,
                        spans=[root, call])
    return save_cassette(cassette, path)


@pytest.mark.parametrize("error", ["boom", ["ValueError", "x"], 7])
def test_show_a_span_whose_error_is_not_what_this_package_writes(error: Any, tmp_path: Path) -> None:
    path = _odd_cassette(tmp_path / "odd.json", "", error)
    shown = run("show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "raised ?" in shown.stdout and "GET http://h/x" in shown.stdout


def test_show_ls_and_diff_never_send_a_cassettes_control_characters_to_the_terminal(
    tmp_path: Path
) -> None:
    hostile = _odd_cassette(tmp_path / ("hostile" + "\x1b[2J.json"), ESC, {"type": "Err" + ESC})
    plain = _odd_cassette(tmp_path / "plain.json", "", None)
    wide = dict(os.environ, COLUMNS="400")
    outputs = {
        "show": run("show", str(hostile), env=wide),
        "ls": run("ls", str(hostile), env=wide),
        "ls dir": run("ls", str(tmp_path), env=wide),
        "diff": run("diff", str(plain), str(hostile), env=wide),
        "show --json": run("show", "--json", str(hostile)),
    }
    for what, out in outputs.items():
        assert out.returncode in (0, 1), (what, out.stderr)
        for ch in ("\x1b", "\x07", "\x9b", "\u202e"):
            assert ch not in out.stdout + out.stderr, (what, ch, out.stdout)
    assert "\\x1b]0;PWNED\\x07" in outputs["show"].stdout
    assert "Err\\x1b]0;PWNED" in outputs["show"].stdout  # the error type, too
    assert "httpx\\x1b]0;PWNED" in outputs["ls"].stdout
    assert "hostile\\x1b[2J.json" in outputs["ls dir"].stdout
    assert "\\x1b]0;PWNED" in outputs["diff"].stdout
    # Still the same JSON: the characters JSON leaves raw are written as \u escapes.
    assert msgspec.json.decode(outputs["show --json"].stdout)["name"] == "name" + ESC


# -- output that cannot be written; headers that would be two ----------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [("show", "--json"), ("show",), ("ls",)])
def test_output_to_a_full_disk_is_one_line_exit_2(args: tuple[str, ...], recorded: Recorded) -> None:
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    with open("/dev/full", "w") as full:
        result = run(*args, str(good), stdout=full)
    one_line_exit_2(result, "cannot write the output (No space left on device)")


@pytest.mark.parametrize("header", ["X-Token: a\r\nX-Admin: 1", "X-Token: a\nb", "X-Token: a\rb",
                                    "X-Token: a\x1b[2Jb"])
def test_a_header_with_a_line_break_is_refused(header: str, recorded: Recorded) -> None:
    cassettes, _, _ = recorded
    [good] = find_cassettes(cassettes)
    result = run("replay", str(good), "--asgi", "nowhere:app", "--header", header)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--header: a header holds no line breaks or other control characters" in result.stderr
