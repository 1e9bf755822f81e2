"""The Celery app of the celery tests: Redis on 127.0.0.1:6379 as broker and result backend
(database 14, its keys deleted by the tests), JSON messages, extended result meta (the task's
name and args come back with its result)."""

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
    worker_hijack_root_logger=False, result_extended=True,
)


@app.task(name="tt.add", shared=False)
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tt.total", shared=False)
def total(values: list[int]) -> int:
    return sum(values)


@app.task(name="tt.on_error", shared=False)
def on_error(task_id: str) -> str:
    """A link_error callback of the old style: it takes the failed task's id."""
    return task_id


@app.task(name="tt.fail", shared=False)
def fail(n: int) -> None:
    raise ValueError(f"bad input {n}")


@app.task(name="tt.profile", shared=False)
def profile(user_id: int, base_url: str) -> dict[str, Any]:
    """A task with a dependency call: what a worker recording keeps beneath the run."""
    data = httpx.get(f"{base_url}/users/{user_id}", timeout=5).json()
    return {"id": user_id, "name": data["name"].title(), "score": data["score"] * 2,
            "tags": sorted(data["tags"])}



@app.task(name="tt.spawn", shared=False)
def spawn(x: int) -> str:
    """Starts another task and returns its id: a result the caller did not send itself."""
    return str(add.delay(x, x).id)


@app.task(name="tt.quota", shared=False)
def quota(user: int) -> None:
    """Raises an exception whose module the producer never imports."""
    from tests.replay_shims.celery_errors import QuotaExceeded

    raise QuotaExceeded(f"user {user} is over quota", user)


@app.task(name="tt.notify", shared=False)
def notify(user: int, token: str = "", api_key: str = "") -> int:
    return user


@app.task(name="tt.flaky", bind=True, shared=False, max_retries=3)
def flaky(self: Any, n: int) -> int:
    """Fails its first attempt and retries: a worker records two runs."""
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return n * 10


@app.task(name="tt.audited", bind=True, shared=False)
def audited(self: Any, n: int, base_url: str) -> dict[str, Any]:
    """Reads its request as a worker set it (host, parent and root ids, delivery info, a custom
    header) and sends part of it to its dependency: a replay must run it with the same."""
    req = self.request
    tenant = getattr(req, "tenant", None)
    data = httpx.get(f"{base_url}/users/{n}", params={"root": req.root_id or "", "tenant": tenant or ""},
                     timeout=5).json()
    return {"name": data["name"], "tenant": tenant, "headers": req.headers, "root": req.root_id,
            "parent": req.parent_id, "host": req.hostname,
            "queue": (req.delivery_info or {}).get("routing_key")}


@app.task(name="tt.nap", shared=False)
def nap(seconds: float) -> float:
    """Sleeps: a run that can be ended under it (revoke(terminate=True))."""
    import time

    time.sleep(seconds)
    return seconds
