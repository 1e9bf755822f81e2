"""A plain-ASGI upstream (not a Starlette instance, so no instrumentor ever traces it)."""

from __future__ import annotations

import json
from typing import Any

PRICES = {"A1": 10.0, "B2": 25.5}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    sku = scope["path"].rsplit("/", 1)[-1]
    body = json.dumps({"sku": sku, "price": PRICES.get(sku, 1.0)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
