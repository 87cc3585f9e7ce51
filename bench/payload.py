"""The one payload every implementation sends: a realistic ~300-byte chat message."""

from __future__ import annotations

import json
from typing import Any

EVENT_NAME = "message"


def chat_message(seq: int) -> dict[str, Any]:
    """A chat message; ``seq`` makes each one distinct, as real message ids do.

    Distinct members matter for the article: its ZADD collapses identical members.
    """
    return {
        "id": 1_000_000 + seq,
        "room": "general-engineering",
        "user": {
            "id": 48213,
            "name": "Ada Lovelace",
            "avatar": "https://cdn.example.com/avatars/48213/3f2a9c1e-64.png",
        },
        "text": "Deploy is green on staging; rolling to prod at 14:30 unless someone objects.",
        "mentions": [],
        "edited": False,
        "reply_to": None,
        "reactions": 3,
    }


def chat_messages(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [chat_message(start + i) for i in range(count)]


def stored_size() -> int:
    """Bytes of one stored message (compact JSON with a 13-digit timestamp)."""
    message = {"event_name": EVENT_NAME, "content": chat_message(0), "timestamp": 1_700_000_000_000}
    return len(json.dumps(message, separators=(",", ":")).encode())


def content_size() -> int:
    """Bytes of the content alone, as ``json.dumps`` writes it."""
    return len(json.dumps(chat_message(0)).encode())
