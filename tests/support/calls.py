"""Counting the calls of a function in a test, the real function still running: how tests show that a fast path
really skips work (JSON parses, SSE splits) instead of only giving the same answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def counted(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Callable[[], int]:
    """Wraps `owner.name` for the rest of the test; the returned function tells how often it was called."""
    real = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return lambda: calls
