"""Celery apps of the RabbitMQ tests: the machine's RabbitMQ (127.0.0.1:5672, guest/guest) as
broker, and as result backend either ``rpc://`` (results sent back over AMQP to the producer's
reply queue, JSON messages) or Redis (database 14, the Celery tests' own, pickle messages).
Each app has a queue of its own, purged by the tests. The broker and the Redis URL come from
the environment when set: a replay points them at a port nothing listens on."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from celery import Celery

BROKER = os.environ.get("TT_AMQP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_BACKEND = os.environ.get("TT_AMQP_REDIS_BACKEND", "redis://127.0.0.1:6379/14")


class PaymentDeclined(Exception):
    """A task's own exception, with more than a message: its args must come back as they were."""


def make_app(name: str, backend: str, serializer: str, broker: str = BROKER) -> Celery:
    """An app of the tests' tasks (``tta.*``), its queue named after it."""
    app = Celery(name, broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_serializer=serializer, result_serializer=serializer,
        accept_content=[serializer, "json"], task_default_queue=name,
        broker_connection_retry_on_startup=False, broker_connection_max_retries=1,
        result_expires=600, worker_hijack_root_logger=False,
        redis_socket_connect_timeout=2, broker_connection_timeout=2,
        # (a Redis backend gone away: one reconnect, not twenty a second apart)
        result_backend_transport_options={"retry_policy": {
            "max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}},
    )

    def quote(order: int) -> Any:
        """Values whose types a serializer may or may not carry: what live gave is the rule."""
        return (Decimal("19.990") * order,
                datetime(2026, 11, 29, 12, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
                datetime(2026, 7, 1, 8, 0, tzinfo=ZoneInfo("Europe/Berlin")),
                b"\x00\xffraw", ("sku", order), {"lines": [("a", 1)]})

    def charge(order: int, amount: str) -> str:
        if Decimal(amount) > 100:
            raise PaymentDeclined(order, "insufficient funds", Decimal(amount))
        return f"charged {order}"

    def lookup(key: str) -> int:
        return {"a": 1}[key]  # (a KeyError for any other key: a built-in exception)

    def slow(seconds: float) -> Decimal:
        time.sleep(seconds)
        return Decimal(str(seconds))

    for task in (quote, charge, lookup, slow):
        app.task(name=f"tta.{task.__name__}", shared=False)(task)
    return app


rpc_app = make_app("tt_amqp_rpc", "rpc://", "json")
redis_app = make_app("tt_amqp_redis", REDIS_BACKEND, "pickle")
