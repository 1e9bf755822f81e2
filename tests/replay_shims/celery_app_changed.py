"""The tests' Celery app after a code change: ``tt.add`` now multiplies. A replayed run of
the recorded ``tt.add`` must tell the difference. (A module of its own: the worker never
imports it.)"""

from __future__ import annotations

import os

from celery import Celery

# (not imported from celery_app: Celery keeps the first task registered under a name)
BROKER = os.environ.get("TT_CELERY_BROKER", "redis://127.0.0.1:6379/14")

app = Celery("tt_tests_changed", broker=BROKER, backend=BROKER)


@app.task(name="tt.add", shared=False)
def add(x: int, y: int) -> int:
    return x * y
