"""Fixtures of the namespace tests (each test gets namespaces of its own)."""

from __future__ import annotations

import pytest

from nsio import Trio


@pytest.fixture
def trio(uid):
    """client -- director -- real server namespaces, removed even when the test fails."""
    t = Trio(uid)
    try:
        yield t.up()
    finally:
        t.down()
