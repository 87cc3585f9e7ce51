"""Live subscriptions that replay what was missed first: sync and asyncio flavours."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Callable, NamedTuple, Union

from ._errors import IncompleteReplayError
from ._native import NativeSubscription


class Position(NamedTuple):
    """Where a subscription stands on one channel: pass it back as ``since`` to resume."""

    cursor: int
    """The timestamp of the last message delivered, or where the stream started."""
    epoch: str | None = None
    """The history the cursor belongs to; None when the log had no bookkeeping."""


Cursor = Union[int, float, str, Position, None]
Since = Union[None, int, float, str, Mapping[str, Cursor]]


def subscription_requests(
    channels: str | Iterable[str], since: Since
) -> list[tuple[str, int | None, str | None]]:
    """``[(channel, cursor or None, epoch or None)]`` from the forms ``subscribe`` accepts."""
    if isinstance(channels, str):
        names = [channels]
    elif isinstance(channels, (bytes, bytearray, memoryview)) or not _iterable(channels):
        # Bytes iterate as ints, which would make a baffling message.
        raise TypeError(
            f"channels must be a str or an iterable of str, not {type(channels).__name__}"
        )
    else:
        names = list(dict.fromkeys(channels))
    if not names:
        raise ValueError("subscribe needs at least one channel")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"channels must be str, not {type(name).__name__}")
    if isinstance(since, Mapping):
        unknown = set(since) - set(names)
        if unknown:
            raise ValueError(f"since names channels not subscribed to: {sorted(unknown)}")
        return [(name, *cursor_and_epoch(since.get(name))) for name in names]
    return [(name, *cursor_and_epoch(since)) for name in names]


def cursor_and_epoch(value: Any) -> tuple[int | None, str | None]:
    if isinstance(value, Position):
        if value.epoch is not None and not isinstance(value.epoch, str):
            raise TypeError(f"epoch must be str or None, not {type(value.epoch).__name__}")
        return cursor(value.cursor), value.epoch
    return cursor(value), None


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


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

    ``position`` tells where it stands on each channel, also before the first message.
    """

    def __init__(self, native: NativeSubscription) -> None:
        self._native = native
        self._positions = _start_positions(native)
        self.closed = False

    @property
    def channels(self) -> list[str]:
        return self._native.channels

    @property
    def position(self) -> dict[str, Position]:
        """Per channel, the cursor of the last message delivered (or reported lost), with its
        epoch; before any, where the stream started: the cursor it was given, or the
        channel's newest timestamp at subscribe time. ``subscribe(..., since=position)``
        resumes with nothing lost and nothing repeated."""
        return dict(self._positions)

    @property
    def queued_bytes(self) -> int:
        """Bytes of live messages received for this subscription and not read yet: at most
        ``subscription_buffer_bytes``; past it, the rest is read from the log later."""
        return self._native.queued_bytes

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> dict[str, Any]:
        message = None if self.closed else self._next(None)
        if message is None:
            self.closed = True
            raise StopIteration
        return message

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, or None after ``timeout`` seconds or once closed."""
        if self.closed:
            return None
        return self._next(timeout)

    def _next(self, timeout: float | None) -> dict[str, Any] | None:
        try:
            message = self._native.next(timeout)
        except IncompleteReplayError as gap:
            _moved_past_gap(self._positions, gap)
            raise
        if message is not None:
            _moved_to(self._positions, message)
        return message

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
        self._positions: dict[str, Position] = {}
        self.closed = False

    async def _open(self) -> None:
        if self._native is None:
            native: NativeSubscription = await self._open_native()
            self._queue = asyncio.Queue()
            self._positions = _start_positions(native)
            native.start_pump(asyncio.get_running_loop(), self._queue)
            self._native = native

    @property
    def channels(self) -> list[str]:
        if self._native is None:
            raise RuntimeError("not subscribed yet: use `async with` or `async for` first")
        return self._native.channels

    @property
    def position(self) -> dict[str, Position]:
        """:attr:`Subscription.position`."""
        if self._native is None:
            raise RuntimeError("not subscribed yet: use `async with` or `async for` first")
        return dict(self._positions)

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message, or None after ``timeout`` seconds or once closed."""
        if self.closed:
            return None
        await self._open()
        assert self._queue is not None
        if timeout is None:
            item = await self._queue.get()
        elif self._queue.empty() and timeout <= 0:
            return None
        else:
            try:
                # Cancelling Queue.get leaves the item in the queue: nothing is lost.
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                return None
        if item is None:
            self.closed = True
            return None
        if isinstance(item, IncompleteReplayError):
            _moved_past_gap(self._positions, item)
        if isinstance(item, BaseException):
            raise item
        _moved_to(self._positions, item)
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


def _start_positions(native: NativeSubscription) -> dict[str, Position]:
    return {
        name: Position(cursor, epoch)
        for name, (cursor, epoch) in zip(native.channels, native.start_positions)
    }


def _moved_to(positions: dict[str, Position], message: dict[str, Any]) -> None:
    channel = message["channel"]
    positions[channel] = positions[channel]._replace(cursor=message["timestamp"])


def _moved_past_gap(positions: dict[str, Position], gap: IncompleteReplayError) -> None:
    if gap.resume is not None:
        epoch = positions[gap.channel].epoch if gap.epoch is None else gap.epoch
        positions[gap.channel] = Position(gap.resume, epoch)
