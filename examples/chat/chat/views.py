"""The chat: a page per room (or several rooms, ``lobby+random``), a POST per message, and one
``EventStreamView`` stream per page with every room of it."""

from __future__ import annotations

import re
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

import replaylog
from replaylog import Position
from replaylog.django.views import EventStreamView, encode_position

ROOMS = ["lobby", "random", "help"]
ROOM_LIST = re.compile(r"[\w-]{1,40}(\+[\w-]{1,40}){0,3}")


def rooms_of(path_part: str) -> list[str]:
    if not ROOM_LIST.fullmatch(path_part):
        raise Http404("no such room")
    return list(dict.fromkeys(path_part.split("+")))


def channel(room: str) -> str:
    return f"chat:{room}"


def room_page(request: HttpRequest, rooms: str) -> HttpResponse:
    """The rooms with the messages they keep; the page's stream resumes right after them."""
    panels = []
    position = {}
    for room in rooms_of(rooms):
        replay = replaylog.replay(channel(room), 0)
        messages = replay.messages
        cursor = messages[-1]["timestamp"] if messages else 0
        position[channel(room)] = Position(cursor, replay.epoch)
        panels.append({"room": room, "channel": channel(room), "messages": messages})
    stream = {
        "url": f"/rooms/{rooms}/events/",
        "lastEventId": encode_position(position),
        "cursors": {c: p.cursor for c, p in position.items()},
    }
    context = {"panels": panels, "all_rooms": ROOMS, "stream": stream, "title": rooms}
    return render(request, "chat/room.html", context)


@require_POST
def post_message(request: HttpRequest, room: str) -> JsonResponse:
    [room] = rooms_of(room)
    author = request.POST.get("author", "").strip()[:40] or "anonymous"
    text = request.POST.get("text", "").strip()[:2000]
    if not text:
        return JsonResponse({"error": "text is required"}, status=400)
    timestamp = replaylog.broadcast(channel(room), "chat", {"author": author, "text": text})
    return JsonResponse({"timestamp": timestamp}, status=201)


class RoomEvents(EventStreamView):
    """Every room of the page on one stream. After a reset, a ``snapshot`` of the room."""

    retry_ms = 250  # reconnect quickly after a dropped connection

    def get_channels(self, request: HttpRequest, rooms: str) -> list[str]:
        return [channel(room) for room in rooms_of(rooms)]

    def reset_events(self, request: HttpRequest, channels: list[str]) -> list[tuple[str, Any]]:
        return [("snapshot", {"channel": c, "messages": replaylog.unspool(c)}) for c in channels]
