"""conftest.py of the sample project the plugin tests run with pytester."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

UPSTREAM = os.environ["SAMPLE_UPSTREAM"]


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # Calls the upstream while the fixture is set up, before the test body runs.
    with httpx.Client(base_url=UPSTREAM) as c:
        assert c.get("/health").json() == {"path": "/health", "query": ""}
        yield c
        c.get("/cleanup")  # and once more at teardown
