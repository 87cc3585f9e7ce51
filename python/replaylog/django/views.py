"""Server-sent events for Django: :class:`EventStreamView`, a browser's live feed of some
channels that resumes from ``Last-Event-ID`` with nothing lost and nothing repeated.

The wire format (other code relies on it):

- ``retry:`` opens the stream, with an ``event: stream-open`` frame whose ``id:`` is the
  position the stream starts from.
- Each message is one event: ``id:`` the stream's position after it, ``event:`` its
  ``event_name``, ``data:`` ``{"channel", "event_name", "content", "prev", "timestamp"}`` as
  one line of JSON. An ``event_name`` that is empty or holds CR or LF goes without ``event:``
  (the browser calls it ``message``); ``data`` still names it.
- ``event: stream-reset``, ``data: {"channels": [...]}``: messages of those channels were lost
  (or the client's position was unreadable); reload their state. The stream goes on live.
- A comment line (``: keep-alive``) after every ``heartbeat`` seconds of silence; no ``id:``.

An ``id:`` encodes, for every channel of the stream, ``<channel, percent-encoded>:<cursor>:
<epoch>``, comma-separated. It is opaque to clients: they only send it back.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, Callable
from urllib.parse import quote, unquote

from asgiref.sync import async_to_sync, sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    StreamingHttpResponse,
)
from django.views import View

import replaylog
from replaylog import (
    AsyncSubscription,
    IncompleteReplayError,
    Position,
    ReplayLog,
    ReplayLogError,
    Subscription,
)

OPEN_EVENT = "stream-open"
RESET_EVENT = "stream-reset"

_POSITION_PART = re.compile(r"([^:,]*):(\d{1,18}):(\d{0,18})")

logger = logging.getLogger(__name__)


def encode_position(position: Mapping[str, Position]) -> str:
    """The ``id:`` of a stream at ``position``."""
    return ",".join(
        f"{quote(channel, safe='')}:{cursor}:{epoch or ''}"
        for channel, (cursor, epoch) in position.items()
    )


def decode_position(text: str) -> dict[str, Position] | None:
    """The positions an ``id:`` names, or None if it is not one this view wrote."""
    positions: dict[str, Position] = {}
    for part in text.split(","):
        match = _POSITION_PART.fullmatch(part)
        if match is None:
            return None
        name, cursor, epoch = match.groups()
        try:
            channel = unquote(name, errors="strict")
        except UnicodeDecodeError:
            return None
        positions[channel] = Position(int(cursor), epoch or None)
    return positions


def _frame(event: str | None, data: Any, event_id: str | None = None) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}\n")
    if event and "\r" not in event and "\n" not in event:
        lines.append(f"event: {event}\n")
    # json.dumps escapes every control character: the data is always one line.
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}\n\n")
    return "".join(lines)


async def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A hook's result: awaited if it is a coroutine function, else run in a thread, where
    Django's ORM and ``request.user`` may be used."""
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    return await sync_to_async(method)(*args, **kwargs)


def _call_sync(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`_call` for the WSGI stream's thread."""
    if inspect.iscoroutinefunction(method):
        return async_to_sync(method)(*args, **kwargs)
    return method(*args, **kwargs)


class EventStreamView(View):
    """A stream of server-sent events with the messages of some channels, in order per
    channel, each exactly once across the browser's reconnects.

    Use it as it is, ``EventStreamView.as_view(channels=["lobby"])``, or subclass it and
    override :meth:`get_channels`, :meth:`has_permission` and :meth:`reset_events`. Under
    ASGI no thread is held per client; under WSGI each client holds one thread.
    """

    http_method_names = ["get"]

    channels: Iterable[str] = ()
    """The channels of :meth:`get_channels`'s default."""
    heartbeat: float = 15.0
    """Seconds of silence after which a comment line keeps proxies from closing the stream."""
    retry_ms: int = 1000
    """How long the browser waits before it reconnects (the ``retry:`` field)."""
    max_channels: int = 32
    """More channels than this in one stream: 400 Bad Request."""
    max_replay: int = 1000
    """The most messages replayed to a connection; a channel that would go past it is reset."""
    max_event_id: int = 16_384
    """A longer ``Last-Event-ID`` is not read (the stream resets)."""
    log: ReplayLog | None = None
    """The replay log to read; None: the default one (``replaylog.get_default()``)."""

    def get_channels(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Iterable[str]:
        """The channels of this stream, from the URL's arguments; default: ``channels``."""
        return self.channels

    def has_permission(self, request: HttpRequest, channels: list[str]) -> bool:
        """False answers 403 before any byte of the stream. Default: allowed."""
        return True

    def reset_events(self, request: HttpRequest, channels: list[str]) -> Iterable[tuple[str, Any]]:
        """Events ``(event, data)`` sent right after a ``stream-reset`` of ``channels``, such
        as a snapshot of their state. The position moves past the reset only with the last of
        them, so a client that drops before it gets the reset again. Default: none."""
        return ()

    async def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        channels = [str(c) for c in await _call(self.get_channels, request, *args, **kwargs)]
        channels = list(dict.fromkeys(channels))
        if not channels:
            return HttpResponseBadRequest("no channels to stream")
        if len(channels) > self.max_channels:
            return HttpResponseBadRequest(f"at most {self.max_channels} channels per stream")
        if not await _call(self.has_permission, request, channels):
            return HttpResponseForbidden()
        resume = request.headers.get("Last-Event-ID") or request.GET.get("lastEventId") or None
        stream = _Stream(self, request, channels, resume)
        content: AsyncIterator[str] | Iterator[str]
        content = stream.events() if isinstance(request, ASGIRequest) else stream.events_sync()
        response = StreamingHttpResponse(content, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response


class _Stream:
    """One connection's stream: what to resume from, then the frames."""

    def __init__(
        self, view: EventStreamView, request: HttpRequest, channels: list[str], resume: str | None
    ) -> None:
        self.view = view
        self.request = request
        self.channels = channels
        self.log = view.log or replaylog.get_default()
        # Per channel: the position to resume from, or None to start from now.
        self.since: dict[str, Position | None] = dict.fromkeys(channels)
        self.reset: list[str] = []
        if resume is not None:
            known = decode_position(resume) if len(resume) <= view.max_event_id else None
            for channel in channels:
                position = (known or {}).get(channel)
                if position is None:
                    self.reset.append(channel)  # a history this client cannot vouch for
                self.since[channel] = position

    def _cap_replay(self, replays: Mapping[str, list[Any]]) -> None:
        """Channels whose replay would take the connection past ``max_replay`` start from
        now, with a reset."""
        replayed = 0
        for channel in self.channels:
            replayed += len(replays.get(channel, ()))
            if replayed > self.view.max_replay:
                self.since[channel] = None
                self.reset.append(channel)

    def _cursors(self) -> dict[str, int]:
        return {c: p.cursor for c, p in self.since.items() if p is not None}

    def _opening(self, position: Mapping[str, Position]) -> str:
        opening = _frame(OPEN_EVENT, {"channels": self.channels}, encode_position(position))
        return f"retry: {self.view.retry_ms}\n{opening}"

    def _reset(self, channels: list[str], events: Iterable[tuple[str, Any]], at: str) -> str:
        frames = [(RESET_EVENT, {"channels": channels}), *events]
        return "".join(
            _frame(event, data, at if i == len(frames) - 1 else None)
            for i, (event, data) in enumerate(frames)
        )

    def _unavailable(self, error: ReplayLogError) -> str:
        """Redis could not be reached: the stream ends at once, and the browser tries again
        after ``retry_ms`` with the same ``Last-Event-ID``."""
        logger.warning("event stream of %s not opened: %s", self.channels, error)
        return f"retry: {self.view.retry_ms}\n: unavailable\n\n"

    def _after(self, message: Any, subscription: Subscription | AsyncSubscription) -> str | None:
        """What a wait on the subscription gives the browser: the message's frame, a
        keep-alive comment after a quiet heartbeat, or None once the subscription closed."""
        if message is not None:
            return _frame(message["event_name"], message, encode_position(subscription.position))
        if subscription.closed:
            return None
        return ": keep-alive\n\n"

    async def events(self) -> AsyncIterator[str]:
        limit = self.view.max_replay + 1
        try:
            replays = await self.log.aunspool_many(self._cursors(), raw=True, limit=limit)
            self._cap_replay(replays)
            subscription = self.log.asubscribe(self.channels, since=self.since)
            await subscription.__aenter__()
        except ReplayLogError as error:
            yield self._unavailable(error)
            return
        async with subscription:
            yield self._opening(subscription.position)
            reset = self.reset
            while True:
                if reset:
                    events = await _call(self.view.reset_events, self.request, reset)
                    yield self._reset(reset, events, encode_position(subscription.position))
                    reset = []
                try:
                    message = await subscription.get(timeout=self.view.heartbeat)
                except IncompleteReplayError as gap:
                    reset = [gap.channel]
                    continue
                frame = self._after(message, subscription)
                if frame is None:
                    return
                yield frame

    def events_sync(self) -> Iterator[str]:
        limit = self.view.max_replay + 1
        try:
            self._cap_replay(self.log.unspool_many(self._cursors(), raw=True, limit=limit))
            subscription = self.log.subscribe(self.channels, since=self.since)
        except ReplayLogError as error:
            yield self._unavailable(error)
            return
        with subscription:
            yield self._opening(subscription.position)
            reset = self.reset
            while True:
                if reset:
                    events = _call_sync(self.view.reset_events, self.request, reset)
                    yield self._reset(reset, events, encode_position(subscription.position))
                    reset = []
                try:
                    message = subscription.get(timeout=self.view.heartbeat)
                except IncompleteReplayError as gap:
                    reset = [gap.channel]
                    continue
                frame = self._after(message, subscription)
                if frame is None:
                    return
                yield frame
