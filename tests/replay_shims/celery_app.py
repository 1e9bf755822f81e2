"""The Celery app of the celery tests: Redis on 127.0.0.1:6379 as broker and result backend
(database 14, its keys deleted by the tests), JSON messages."""

from __future__ import annotations

import os
from typing import Any

import httpx
from celery import Celery

BROKER = os.environ.get("TT_CELERY_BROKER", "redis://127.0.0.1:6379/14")

app = Celery("tt_tests", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    broker_connection_retry_on_startup=False, result_expires=600,
    worker_hijack_root_logger=False,
)


@app.task(name="tt.add", shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tt.fail", shared=False)
def fail(n: int) -> None:
    raise ValueError(f"bad input {n}")


@app.task(name="tt.profile", shared=False)
def profile(user_id: int, base_url: str) -> dict[str, Any]:
    """A task with a dependency call: what a worker recording keeps beneath the run."""
    data = httpx.get(f"{base_url}/users/{user_id}", timeout=5).json()
    return {"id": user_id, "name": data["name"].title(), "score": data["score"] * 2,
            "tags": sorted(data["tags"])}

