"""Chat views: POST broadcasts a message to a room; GET replays what a client missed.

``messages`` is a sync view; ``async_messages`` and ``stream`` (server-sent events) are async
views on replaylog's asyncio API, served by uvicorn in tests/test_asgi.py. ``post_message`` and
``async_post_message`` save the message in the database and broadcast it once that commits.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Callable

from django.db.models import F
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.views.decorators.http import require_http_methods

import replaylog
from replaylog.django import abroadcast_on_commit, broadcast_on_commit
from replaylog.django.views import EventStreamView

from .models import Message, Room


@require_http_methods(["GET", "POST"])
def messages(request: HttpRequest, room: str) -> JsonResponse:
    if request.method == "POST":
        text = request.POST.get("text")
        if not text:
            return JsonResponse({"error": "text is required"}, status=400)
        author = request.POST.get("author", "anonymous")
        timestamp = replaylog.broadcast(room, "chat", {"author": author, "text": text})
        return JsonResponse({"timestamp": timestamp}, status=201)
    # A reconnecting client sends the timestamp of the last message it got.
    since = request.GET.get("since", "0")
    try:
        missed = replaylog.unspool(room, since)
    except replaylog.ReplayLogError:  # a ConfigurationError is a ValueError too: not a 400
        raise
    except (TypeError, ValueError):
        return JsonResponse({"error": f"since must be a number, got {since!r}"}, status=400)
    return JsonResponse({"messages": missed})


@require_http_methods(["POST"])
def post_message(request: HttpRequest, room: str) -> JsonResponse:
    """Saves a message, then counts it in its room; subscribers hear of it once that commits.

    Under ``ATOMIC_REQUESTS`` the 404 of an unknown room rolls the message back, and with it the
    broadcast.
    """
    text = request.POST.get("text")
    if not text:
        return JsonResponse({"error": "text is required"}, status=400)
    message = Message.objects.create(
        room=room, author=request.POST.get("author", "anonymous"), text=text
    )
    broadcast_on_commit(room, "message.created", message.as_event())
    if not Room.objects.filter(name=room).update(message_count=F("message_count") + 1):
        raise Http404("no such room")
    return JsonResponse({"id": message.pk}, status=201)


# --- async views: the asyncio API in Django async views (under ASGI: uvicorn, AsyncClient) ------

AsyncView = Callable[..., Awaitable[HttpResponse]]


def async_require_http_methods(methods: list[str]) -> Callable[[AsyncView], AsyncView]:
    """``require_http_methods`` for async views: Django's handles those from 5.0 on, and Python
    3.9 gets Django 4.2."""

    def decorator(view: AsyncView) -> AsyncView:
        @functools.wraps(view)
        async def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return HttpResponseNotAllowed(methods)
            return await view(request, *args, **kwargs)

        return checked

    return decorator


@async_require_http_methods(["GET", "POST"])
async def async_messages(request: HttpRequest, room: str) -> JsonResponse:
    if request.method == "POST":
        text = request.POST.get("text")
        if not text:
            return JsonResponse({"error": "text is required"}, status=400)
        author = request.POST.get("author", "anonymous")
        timestamp = await replaylog.abroadcast(room, "chat", {"author": author, "text": text})
        return JsonResponse({"timestamp": timestamp}, status=201)
    since = request.GET.get("since", "0")
    try:
        replay = await replaylog.areplay(room, since, epoch=request.GET.get("epoch"))
    except replaylog.ReplayLogError:
        raise
    except (TypeError, ValueError):
        return JsonResponse({"error": f"since must be a number, got {since!r}"}, status=400)
    return JsonResponse(
        {"messages": replay.messages, "complete": replay.complete, "epoch": replay.epoch}
    )


@async_require_http_methods(["POST"])
async def async_post_message(request: HttpRequest, room: str) -> JsonResponse:
    """``post_message`` for async code: saved in autocommit, so broadcast at once."""
    text = request.POST.get("text")
    if not text:
        return JsonResponse({"error": "text is required"}, status=400)
    message = await Message.objects.acreate(
        room=room, author=request.POST.get("author", "anonymous"), text=text
    )
    sent = await abroadcast_on_commit(room, "message.created", message.as_event())
    return JsonResponse({"id": message.pk, "timestamp": sent.timestamp}, status=201)


@async_require_http_methods(["GET"])
async def stream(request: HttpRequest, room: str) -> HttpResponse:
    """Server-sent events: what the client missed after ``?since=``, then live messages.

    ``?n=`` stops the stream after that many messages (0 or absent: never). Right after the
    subscription is in place, the stream sends the SSE comment ``: subscribed``.
    """
    since = request.GET.get("since")
    try:
        limit = int(request.GET.get("n", "0"))
        subscription = replaylog.asubscribe(room, since=since)
    except replaylog.ReplayLogError:
        raise
    except (TypeError, ValueError):
        return JsonResponse({"error": "since and n must be numbers"}, status=400)

    async def events() -> AsyncIterator[str]:
        sent = 0
        async with subscription as sub:
            yield ": subscribed\n\n"
            while not sub.closed:
                try:
                    async for message in sub:
                        sent += 1
                        yield f"id: {message['timestamp']}\ndata: {json.dumps(message)}\n\n"
                        if sent == limit:
                            return
                except replaylog.IncompleteReplayError as exc:
                    # Messages after the cursor are gone: the client must reload its state.
                    gone = {"channel": exc.channel, "since": exc.since}
                    yield f"event: incomplete\ndata: {json.dumps(gone)}\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


# --- EventStreamView: server-sent events with Last-Event-ID resume (tests/test_event_stream.py) --


class RoomEvents(EventStreamView):
    """``/events/<rooms>/``: the rooms, ``+``-separated; room ``forbidden`` answers 403.

    After a reset it sends a ``snapshot`` event per reset channel when ``?snapshot=1``.
    """

    def get_channels(self, request: HttpRequest, rooms: str) -> list[str]:
        return rooms.split("+")

    def has_permission(self, request: HttpRequest, channels: list[str]) -> bool:
        return "forbidden" not in channels

    def reset_events(self, request: HttpRequest, channels: list[str]) -> list[tuple[str, Any]]:
        if request.GET.get("snapshot") != "1":
            return []
        return [("snapshot", {"channel": c, "size": len(replaylog.unspool(c))}) for c in channels]
