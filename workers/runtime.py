"""Shared plumbing for long-running worker processes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def stop_on_signals(stop: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Call ``stop`` once on SIGINT or SIGTERM (the process then exits when its run ends)."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def _handler() -> None:
        if not tasks:
            tasks.append(loop.create_task(stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _handler)
