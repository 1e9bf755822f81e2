"""An exception only the worker imports (from inside the task that raises it): the producer
rebuilds it as Celery's stand-in class, live and in replay alike."""

from __future__ import annotations


class QuotaExceeded(Exception):
    pass
