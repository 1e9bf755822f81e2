"""`timetracer-otel html`: a hostile cassette renders as inert, escaped text."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from timetracer_otel.cassette import Cassette, Event, SpanRecord, save_cassette
from timetracer_otel.cli import main

EVIL = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"


def hostile(tmp_path: Path) -> Path:
    span = SpanRecord(
        trace_id="a" * 32, span_id="b" * 16, name=EVIL, kind="CLIENT", library=EVIL, key="k",
        label=EVIL, request={EVIL: EVIL, "body": EVIL.encode()}, error={"type": EVIL, "message": EVIL},
        attributes={EVIL: [EVIL]}, events=[Event(name=EVIL, time_ns=1, attributes={"m": EVIL})],
        status="ERROR",
    )
    c = Cassette(id=EVIL, name=EVIL, created=EVIL, root="b" * 16, spans=[span])
    return save_cassette(c, tmp_path / "evil.json")


def test_html_escapes_every_value_and_has_no_script(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "page.html"
    result = CliRunner().invoke(main, ["html", str(hostile(tmp_path)), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "onerror=alert(2)>" not in page  # only inside escaped text
    assert page.count("&lt;script&gt;") >= 5
    assert "default-src 'none'" in page
    tags = set(re.findall(r"<([a-zA-Z0-9]+)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h4", "p", "table", "tr", "th",
                    "td", "span", "details", "summary", "pre"}


def test_html_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"id": 1}')
    result = CliRunner().invoke(main, ["html", str(bad), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "corrupt" in result.output
    assert not (tmp_path / "x.html").exists()
