"""The Celery app scenario 4b's celery rows run: Redis on 127.0.0.1:6379 (database 12) as broker
and result backend, a worker started as its own process (``python -m celery -A
benchmarks.celery_tasks worker --pool=solo``)."""

from __future__ import annotations

from typing import Any

from celery import Celery

BROKER = "redis://127.0.0.1:6379/12"

app = Celery("bench", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=False, result_expires=600)


@app.task(name="bench.quote", shared=False)
def quote(sku: str, qty: int) -> dict[str, Any]:
    return {"sku": sku, "qty": qty, "total": round(qty * 9.99, 2), "tags": ["a", "b"]}
