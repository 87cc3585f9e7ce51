"""Called on the event loop's thread by the Rust core, through ``call_soon_threadsafe``."""

from __future__ import annotations

import asyncio
from typing import Any


def resolve(future: asyncio.Future[Any], failed: bool, value: Any) -> None:
    """Settles ``future`` unless it was cancelled meanwhile."""
    if future.done():
        return
    if failed:
        future.set_exception(value)
    else:
        future.set_result(value)


def put_all(queue: asyncio.Queue[Any], items: list[Any]) -> None:
    for item in items:
        queue.put_nowait(item)
