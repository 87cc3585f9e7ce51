"""Broadcast when the database transaction commits: :func:`broadcast_on_commit`.

A view that saves a row and calls :func:`replaylog.broadcast` inside ``transaction.atomic()`` (or
under ``ATOMIC_REQUESTS``) publishes before the commit: subscribers hear of a row that other
requests cannot see yet, or that is rolled back a moment later. :func:`broadcast_on_commit` hands
the broadcast to Django's ``transaction.on_commit`` instead:

- The content is serialized at the call, as :func:`replaylog.broadcast` would serialize it: bad
  content raises there, and a later change to the content changes nothing.
- The broadcast runs when the outermost atomic block of the database ``using`` commits, and never
  if it rolls back; a savepoint rolled back drops the broadcasts scheduled inside it. Outside an
  atomic block it runs at once. These are ``on_commit``'s rules.
- It never raises into code that already committed. A failed attempt is logged to the
  ``replaylog.django.on_commit`` logger with the channel and the event name (never the content)
  and retried once, at once, with the same idempotency key: an attempt whose reply was lost but
  which Redis applied is not published twice.

Importing this module does not import Django; calling it does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._native import decode_json, encode_json

if TYPE_CHECKING:
    from .. import ReplayLog

__all__ = [
    "PendingBroadcast",
    "abroadcast_on_commit",
    "broadcast_on_commit",
    "broadcasts_in",
]

logger = logging.getLogger(__name__)

#: How many times a broadcast is tried after the commit: once, and once more if that failed.
ATTEMPTS = 2

Default = Optional[Callable[[Any], Any]]


class PendingBroadcast:
    """A broadcast waiting for its transaction: the callable handed to ``transaction.on_commit``.

    ``channel``, ``event_name``, ``content`` and ``idempotency_key`` say what it publishes.
    ``timestamp`` is None until it is published, then the message's timestamp (also when a
    retry found the message already there). Calling it broadcasts and never raises; calling it
    again within the log's idempotency window publishes nothing more.
    """

    def __init__(
        self,
        log: ReplayLog,
        channel: str,
        event_name: str,
        content: Any,
        *,
        idempotency_key: str | None = None,
        default: Default = None,
    ) -> None:
        # What broadcast would refuse after the commit is refused now, in the caller's code.
        _check_key_text("channel", channel)
        if not isinstance(event_name, str):
            raise TypeError(f"event_name must be str, not {type(event_name).__name__}")
        if idempotency_key is not None:
            _check_key_text("idempotency_key", idempotency_key)
        self.log = log
        self.channel = channel
        self.event_name = event_name
        # Serialized now: a change to ``content`` after the call must not reach subscribers.
        self.content_json: bytes = encode_json(content, default or log.default)
        # Without a key of the caller's, a fresh one: what lets the retry not publish twice.
        self.idempotency_key = uuid.uuid4().hex if idempotency_key is None else idempotency_key
        self.timestamp: int | None = None

    @property
    def content(self) -> Any:
        """The content as it will be published (a fresh copy, decoded from ``content_json``)."""
        return decode_json(self.content_json)

    def __repr__(self) -> str:
        # No content: a repr ends up in logs and test reports.
        return (
            f"PendingBroadcast(channel={self.channel!r}, event_name={self.event_name!r}, "
            f"timestamp={self.timestamp!r})"
        )

    def __call__(self) -> None:
        """Broadcast now, retrying once; failures are logged, never raised."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self.timestamp = self.log.broadcast(
                    self.channel,
                    self.event_name,
                    self.content,
                    idempotency_key=self.idempotency_key,
                )
            except Exception as error:
                self._report(error, attempt)
            else:
                return

    async def abroadcast(self) -> None:
        """:meth:`__call__` without blocking the event loop."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self.timestamp = await self.log.abroadcast(
                    self.channel,
                    self.event_name,
                    self.content,
                    idempotency_key=self.idempotency_key,
                )
            except Exception as error:
                self._report(error, attempt)
            else:
                return

    def _report(self, error: Exception, attempt: int) -> None:
        # The content stays out of the log: it may be meant for the channel's members only.
        where = {"channel": self.channel, "event_name": self.event_name}
        if attempt < ATTEMPTS:
            logger.warning(
                "replaylog: broadcast of %r on channel %r after the commit failed (%s: %s); "
                "retrying once with the same idempotency key",
                self.event_name, self.channel, type(error).__name__, error,
                extra=where,
            )  # fmt: skip
        else:
            logger.error(
                "replaylog: broadcast of %r on channel %r after the commit failed %d times; "
                "dropped",
                self.event_name, self.channel, attempt,
                exc_info=error, extra=where,
            )  # fmt: skip


def schedule(
    log: ReplayLog,
    channel: str,
    event_name: str,
    content: Any,
    *,
    using: str | None,
    idempotency_key: str | None,
    default: Default,
) -> PendingBroadcast:
    """What :meth:`replaylog.ReplayLog.broadcast_on_commit` does."""
    from django.db import transaction

    pending = PendingBroadcast(
        log, channel, event_name, content, idempotency_key=idempotency_key, default=default
    )
    transaction.on_commit(pending, using=using)
    return pending


async def aschedule(
    log: ReplayLog,
    channel: str,
    event_name: str,
    content: Any,
    *,
    using: str | None,
    idempotency_key: str | None,
    default: Default,
) -> PendingBroadcast:
    """What :meth:`replaylog.ReplayLog.abroadcast_on_commit` does."""
    from asgiref.sync import sync_to_async

    pending = PendingBroadcast(
        log, channel, event_name, content, idempotency_key=idempotency_key, default=default
    )
    # Django's connections belong to threads: the transaction to wait for, if any, is open on
    # the thread where this request's synchronous ORM work runs.
    if not await sync_to_async(_wait_for_commit, thread_sensitive=True)(pending, using):
        await pending.abroadcast()
    return pending


def _wait_for_commit(pending: PendingBroadcast, using: str | None) -> bool:
    """Hand ``pending`` to ``on_commit`` if ``using`` is in an atomic block; tell if it was."""
    from django.db import transaction

    if not transaction.get_connection(using).in_atomic_block:
        return False
    transaction.on_commit(pending, using=using)
    return True


def broadcast_on_commit(
    channel: str,
    event_name: str,
    content: Any,
    *,
    using: str | None = None,
    idempotency_key: str | None = None,
    default: Default = None,
) -> PendingBroadcast:
    """:meth:`replaylog.ReplayLog.broadcast_on_commit` on the default log."""
    from .. import get_default

    return get_default().broadcast_on_commit(
        channel,
        event_name,
        content,
        using=using,
        idempotency_key=idempotency_key,
        default=default,
    )


async def abroadcast_on_commit(
    channel: str,
    event_name: str,
    content: Any,
    *,
    using: str | None = None,
    idempotency_key: str | None = None,
    default: Default = None,
) -> PendingBroadcast:
    """:meth:`replaylog.ReplayLog.abroadcast_on_commit` on the default log."""
    from .. import get_default

    return await get_default().abroadcast_on_commit(
        channel,
        event_name,
        content,
        using=using,
        idempotency_key=idempotency_key,
        default=default,
    )


def broadcasts_in(callbacks: Iterable[Callable[[], Any]]) -> list[PendingBroadcast]:
    """The broadcasts among on-commit callbacks, in order.

    For the lists that ``TestCase.captureOnCommitCallbacks`` and pytest-django's
    ``django_capture_on_commit_callbacks`` yield.
    """
    return [callback for callback in callbacks if isinstance(callback, PendingBroadcast)]


def _check_key_text(name: str, value: Any) -> None:
    """A str that can be part of a Redis key: lone surrogates raise UnicodeEncodeError."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")
    value.encode()
