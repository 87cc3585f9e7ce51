"""Chat views: POST broadcasts a message to a room; GET replays what a client missed."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_http_methods

import replaylog


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
