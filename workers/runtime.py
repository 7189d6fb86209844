"""Shared plumbing for long-running worker processes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def stop_on_signals(stop: Callable[[], Awaitable[None]]) -> None:
    """Call ``stop`` once on SIGINT or SIGTERM (the process then exits when its run ends)."""
    loop = asyncio.get_running_loop()
    triggered = False

    def _handler() -> None:
        nonlocal triggered
        if not triggered:
            triggered = True
            loop.create_task(stop())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _handler)
