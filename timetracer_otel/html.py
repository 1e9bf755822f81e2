"""A cassette as one static HTML page: no script, a strict Content-Security-Policy, and every
value from the cassette escaped, so a hostile cassette cannot run code in the reader's browser::

    $ timetracer-otel html cassettes/2026-11-26/GET__users__4bf9.msgpack -o users.html
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

from timetracer_otel.cassette import Cassette, SpanRecord

# Payload blocks beyond this are cut: the page is for reading, the cassette keeps everything.
MAX_BLOCK_CHARS = 64 * 1024

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.lib{color:#06c}.err{color:#b00}
.dim{color:#777}pre{background:#f8f8f8;padding:8px;overflow:auto;max-height:30em;white-space:pre-wrap}
"""


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _block(title: str, value: Any) -> str:
    text = json.dumps(_jsonable(value), indent=1, ensure_ascii=False, default=repr)
    if len(text) > MAX_BLOCK_CHARS:
        text = text[:MAX_BLOCK_CHARS] + f"\n... ({len(text) - MAX_BLOCK_CHARS} more characters)"
    return f"<h4>{escape(title)}</h4><pre>{escape(text)}</pre>"


def _row(span: SpanRecord, t0: int) -> str:
    label = span.label or span.name
    lib = f'<span class="lib">{escape(span.library)}</span> ' if span.library else ""
    status = escape(span.status)
    if span.error is not None:
        err = span.error.get("type", "?") if isinstance(span.error, dict) else "?"
        status = f'<span class="err">raised {escape(str(err))}</span>'
    details = ""
    if span.library or span.attributes:
        blocks = [_block("attributes", span.attributes)]
        if span.library:
            outcome = ("error", span.error) if span.error is not None else ("response", span.response)
            blocks += [_block("request", span.request), _block(*outcome)]
        details = f"<details><summary>details</summary>{''.join(blocks)}</details>"
    return (
        f"<tr><td class=dim>+{(span.start_ns - t0) / 1e6:.2f} ms</td><td>{span.duration_ns / 1e6:.2f} ms</td>"
        f"<td>{escape(span.kind)}</td><td>{lib}{escape(label)}{details}</td><td>{status}"
        f"{' (truncated)' if span.truncated else ''}</td></tr>"
    )


def render(cassette: Cassette) -> str:
    """The whole page as a string."""
    spans = sorted(cassette.spans, key=lambda s: s.start_ns)
    t0 = spans[0].start_ns if spans else 0
    title = escape(cassette.name)
    rows = "".join(_row(s, t0) for s in spans)
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<meta name=referrer content=no-referrer><title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1><p class=dim>{escape(cassette.created)} · {len(spans)} spans · "
        f"{len(cassette.interactions)} calls · {'complete' if cassette.complete else 'incomplete'} · "
        f"id {escape(cassette.id)}</p>"
        f"<table><tr><th>start</th><th>duration</th><th>kind</th><th>span</th><th>status</th></tr>{rows}"
        "</table></body></html>\n"
    )
