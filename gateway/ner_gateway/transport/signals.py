"""SIGTERM/SIGINT as two events: the first signal asks to stop (drain, then stop), a second one to hurry."""

from __future__ import annotations

import asyncio
import signal


def shutdown_events() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, hurry), set by the first and by any later SIGTERM/SIGINT on the running loop."""
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop, hurry
