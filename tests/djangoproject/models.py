"""The tiny Django project's models: chat rooms and their messages."""

from __future__ import annotations

from typing import Any

from django.db import models


class Room(models.Model):
    name = models.CharField(max_length=100, unique=True)
    message_count = models.PositiveIntegerField(default=0)


class Message(models.Model):
    room = models.CharField(max_length=100)
    author = models.CharField(max_length=100)
    text = models.TextField()

    def as_event(self) -> dict[str, Any]:
        """What subscribers of the room get when this message is saved."""
        return {"id": self.pk, "author": self.author, "text": self.text}
