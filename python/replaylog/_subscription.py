"""Live subscriptions that replay what was missed first: sync and asyncio flavours."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Callable, Union

from ._native import NativeSubscription

Since = Union[None, int, float, str, Mapping[str, Union[int, float, str, None]]]


def subscription_requests(
    channels: str | Iterable[str], since: Since
) -> list[tuple[str, int | None]]:
    """``[(channel, cursor or None)]`` from the forms ``subscribe`` accepts."""
    names = [channels] if isinstance(channels, str) else list(dict.fromkeys(channels))
    if not names:
        raise ValueError("subscribe needs at least one channel")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"channels must be str, not {type(name).__name__}")
    if isinstance(since, Mapping):
        unknown = set(since) - set(names)
        if unknown:
            raise ValueError(f"since names channels not subscribed to: {sorted(unknown)}")
        return [(name, cursor(since.get(name))) for name in names]
    return [(name, cursor(since)) for name in names]


def cursor(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"since must be a number, a numeric string or None, not {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"since must be numeric, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"since must be finite, got {value!r}")
    return int(number)


class Subscription:
    """Messages of some channels: first those after each cursor, then live ones, in order per
    channel, with no gap and no duplicate, across reconnects of its pub/sub connection.

    Each message is a dict ``{"channel", "event_name", "content", "timestamp"}``. Iterating
    raises :class:`replaylog.IncompleteReplayError` when messages after the cursor are gone;
    catch it, reload that channel's state, and keep iterating.
    """

    def __init__(self, native: NativeSubscription) -> None:
        self._native = native
        self.closed = False

    @property
    def channels(self) -> list[str]:
        return self._native.channels

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> dict[str, Any]:
        message = None if self.closed else self._native.next(None)
        if message is None:
            self.closed = True
            raise StopIteration
        return message

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, or None after ``timeout`` seconds or once closed."""
        if self.closed:
            return None
        return self._native.next(timeout)

    def close(self) -> None:
        """Unsubscribes and releases the pub/sub connection."""
        self._native.close()
        self.closed = True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSubscription:
    """:class:`Subscription` for asyncio: ``async with`` and ``async for``.

    It subscribes on entry (or at the first ``async for`` step); the event loop never waits
    on Redis.
    """

    def __init__(self, open_native: Callable[[], Any]) -> None:
        self._open_native = open_native
        self._native: NativeSubscription | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self.closed = False

    async def _open(self) -> None:
        if self._native is None:
            native: NativeSubscription = await self._open_native()
            self._queue = asyncio.Queue()
            native.start_pump(asyncio.get_running_loop(), self._queue)
            self._native = native

    @property
    def channels(self) -> list[str]:
        if self._native is None:
            raise RuntimeError("not subscribed yet: use `async with` or `async for` first")
        return self._native.channels

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.closed:
            raise StopAsyncIteration
        await self._open()
        assert self._queue is not None
        item = await self._queue.get()
        if item is None:
            self.closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Unsubscribes and releases the pub/sub connection."""
        if self._native is not None:
            self._native.close()
        self.closed = True

    async def __aenter__(self) -> AsyncSubscription:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
