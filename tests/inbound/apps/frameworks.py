"""The same order endpoint on FastAPI and on Litestar (with its own OpenTelemetry plugin)."""

from __future__ import annotations

import os
from typing import Any

import httpx
from fastapi import FastAPI
from litestar import Litestar, post
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin


async def _price(sku: str) -> float:
    async with httpx.AsyncClient(base_url=os.environ["SHOP_UPSTREAM"]) as client:
        return float((await client.get(f"/price/{sku}")).json()["price"])


def _total(price: float, qty: int) -> float:
    return round(price * qty * (1 + float(os.environ.get("SHOP_TAX", "0.1"))), 2)


def make_fastapi() -> FastAPI:
    api = FastAPI()

    @api.post("/orders/{order_id}")
    async def order(order_id: int, body: dict[str, Any]) -> dict[str, Any]:
        price = await _price(body["sku"])
        return {"id": order_id, "price": price, "total": _total(price, int(body.get("qty", 1)))}

    return api


def make_litestar() -> Litestar:
    @post("/orders/{order_id:int}", status_code=200)
    async def order(order_id: int, data: dict[str, Any]) -> dict[str, Any]:
        price = await _price(data["sku"])
        return {"id": order_id, "price": price, "total": _total(price, int(data.get("qty", 1)))}

    return Litestar([order], plugins=[OpenTelemetryPlugin(OpenTelemetryConfig())])
