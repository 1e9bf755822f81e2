"""Route templates of plain Starlette apps (cassette names and the stored request's ``route``),
matched per request scope with a memo that must never answer for another scope or old routes;
and header trees, from bytes as ASGI hands them or from text."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from timetracer_otel.replay_shims.asgi import route_of


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


def scope(
    app: Any, path: str, method: str = "GET", root_path: str = "", type_: str = "http"
) -> dict[str, Any]:
    return {"type": type_, "method": method, "path": path, "root_path": root_path, "app": app,
            "headers": []}


def test_templates_for_full_partial_and_no_match() -> None:
    app = Starlette(routes=[Route("/orders/{id}", ok, methods=["GET"]), Route("/health", ok)])
    for _ in range(2):  # the second round comes from the memo
        assert route_of(scope(app, "/orders/7")) == "/orders/{id}"
        assert route_of(scope(app, "/orders/7", "DELETE")) == "/orders/{id}"  # 405: partial
        assert route_of(scope(app, "/nowhere")) is None


def test_root_path_and_scope_type_are_part_of_the_match() -> None:
    app = Starlette(routes=[Route("/orders/{id}", ok)])
    # Same method and path: without a root_path nothing matches, behind /api the route does.
    assert route_of(scope(app, "/api/orders/7")) is None
    assert route_of(scope(app, "/api/orders/7", root_path="/api")) == "/orders/{id}"
    assert route_of(scope(app, "/api/orders/7")) is None
    # An http Route never matches a websocket scope of the same path.
    assert route_of(scope(app, "/orders/7")) == "/orders/{id}"
    assert route_of(scope(app, "/orders/7", type_="websocket")) is None


def test_routes_added_or_removed_after_requests_are_seen() -> None:
    app = Starlette(routes=[Route("/a", ok)])
    assert route_of(scope(app, "/b/1")) is None
    app.router.routes.append(Route("/b/{n}", ok))
    assert route_of(scope(app, "/b/1")) == "/b/{n}"
    app.router.routes.pop()
    assert route_of(scope(app, "/b/1")) is None


def test_apps_with_mounts_are_matched_without_the_memo() -> None:
    app = Starlette(routes=[Mount("/v1", routes=[Route("/x", ok)]), Route("/y", ok)])
    for _ in range(2):
        assert route_of(scope(app, "/v1/x")) == "/v1"
        assert route_of(scope(app, "/y")) == "/y"
        assert route_of(scope(app, "/z")) is None


def test_header_trees_from_bytes_and_from_servers_that_hand_text() -> None:
    from timetracer_otel.replay_shims.asgi import headers_tree

    raw = [(b"content-type", b"text/plain; charset=\xe9"), (b"x-n", b"1")]
    assert headers_tree(raw) == [["content-type", "text/plain; charset=\u00e9"], ["x-n", "1"]]
    assert headers_tree([("x-n", "1"), (b"x-m", b"2")]) == [["x-n", "1"], ["x-m", "2"]]
    assert headers_tree(None) == []
