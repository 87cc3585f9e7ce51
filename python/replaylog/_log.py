"""The :class:`ReplayLog` class: one log's settings and its native core, sync and asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _paging
from ._native import NativeLog
from ._paging import Replay
from ._settings import Settings, as_expire_ms, resolve
from ._subscription import AsyncSubscription, Since, Subscription, subscription_requests

if TYPE_CHECKING:
    from .django.on_commit import PendingBroadcast

Default = Optional[Callable[[Any], Any]]


class ReplayLog:
    """A replay log on one Redis server: ``broadcast``, ``unspool`` and ``prune_replay_logs``.

    Settings left as ``None`` come from Django settings, then the environment, then defaults:
    ``REPLAYLOG_URL``, ``EXPIRE_REPLAY_LOGS_MS``, ``REPLAYLOG_CONNECT_TIMEOUT``,
    ``REPLAYLOG_RESPONSE_TIMEOUT``, ``REPLAYLOG_BUSY_POLL_US``, ``REPLAYLOG_CHANNEL_PREFIX``,
    ``REPLAYLOG_LOG_PREFIX``, ``REPLAYLOG_META_PREFIX``, ``REPLAYLOG_IDEMPOTENCY_PREFIX``,
    ``REPLAYLOG_MAX_LEN``, ``REPLAYLOG_CLUSTER_KEYS``, ``REPLAYLOG_IDEMPOTENCY_WINDOW_MS``,
    ``REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES`` and ``REPLAYLOG_REPLAY_LIMIT``
    (see the README).
    ``expire_ms`` left as ``None`` is looked up again at each prune, so a changed setting counts.
    The settings are resolved once, into a frozen :class:`~replaylog._settings.Settings`, and
    read back as read-only attributes; only ``default`` may be replaced.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        expire_ms: int | None = None,
        connect_timeout: float | None = None,
        response_timeout: float | None = None,
        busy_poll_us: int | None = None,
        channel_prefix: str | None = None,
        log_prefix: str | None = None,
        meta_prefix: str | None = None,
        idempotency_prefix: str | None = None,
        max_len: int | None = None,
        cluster_keys: bool | None = None,
        idempotency_window_ms: int | None = None,
        subscription_buffer_bytes: int | None = None,
        replay_limit: int | None = None,
        min_replicas: int | None = None,
        replica_timeout: float | None = None,
        sharded_pubsub: bool | None = None,
        default: Default = None,
    ) -> None:
        self._settings = Settings.resolve(
            url,
            expire_ms=expire_ms,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
            busy_poll_us=busy_poll_us,
            channel_prefix=channel_prefix,
            log_prefix=log_prefix,
            meta_prefix=meta_prefix,
            idempotency_prefix=idempotency_prefix,
            max_len=max_len,
            cluster_keys=cluster_keys,
            idempotency_window_ms=idempotency_window_ms,
            subscription_buffer_bytes=subscription_buffer_bytes,
            replay_limit=replay_limit,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            sharded_pubsub=sharded_pubsub,
        )
        if default is not None and not callable(default):
            raise TypeError(f"default must be callable, got {type(default).__name__}")
        # Read at each broadcast, so it may be replaced; the settings may not.
        self.default = default
        self._native = NativeLog(self._settings)

    @property
    def url(self) -> str:
        """The Redis URL, with any password masked."""
        return self._settings.masked_url

    @property
    def expire_ms(self) -> int:
        """How old, in milliseconds, an entry may get before ``prune_replay_logs`` removes it."""
        if self._settings.expire_ms_from_setting:
            return resolve("EXPIRE_REPLAY_LOGS_MS", None, as_expire_ms)
        return self._settings.expire_ms

    @property
    def connect_timeout(self) -> float:
        """Seconds to connect and log in to Redis."""
        return self._settings.connect_timeout

    @property
    def response_timeout(self) -> float:
        """Seconds a request waits for its reply."""
        return self._settings.response_timeout

    @property
    def busy_poll_us(self) -> int:
        """Microseconds a lone synchronous call polls for its reply before it sleeps."""
        return self._settings.busy_poll_us

    @property
    def channel_prefix(self) -> str:
        """The prefix of the pub/sub channels: ``mq:``."""
        return self._settings.channel_prefix

    @property
    def log_prefix(self) -> str:
        """The prefix of the logs' keys: ``replay:``."""
        return self._settings.log_prefix

    @property
    def meta_prefix(self) -> str:
        """The prefix of the logs' bookkeeping keys: ``replaymeta:``."""
        return self._settings.meta_prefix

    @property
    def idempotency_prefix(self) -> str:
        """The prefix of the idempotency keys: ``replayonce:``."""
        return self._settings.idempotency_prefix

    @property
    def max_len(self) -> int:
        """The most entries a log keeps; 0: no cap."""
        return self._settings.max_len

    @property
    def cluster_keys(self) -> bool:
        """Whether each key carries its channel as a Redis Cluster hash tag."""
        return self._settings.cluster_keys

    @property
    def sharded_pubsub(self) -> bool:
        """Whether a cluster publishes with SPUBLISH (each message to its shard)."""
        return self._settings.sharded_pubsub

    @property
    def idempotency_window_ms(self) -> int:
        """How long, in ms, a broadcast's idempotency key is remembered."""
        return self._settings.idempotency_window_ms

    @property
    def subscription_buffer_bytes(self) -> int:
        """The most bytes a subscription holds for a consumer that lags."""
        return self._settings.subscription_buffer_bytes

    @property
    def replay_limit(self) -> int:
        """The most messages an unspool or replay returns when given no limit."""
        return self._settings.replay_limit

    @property
    def min_replicas(self) -> int:
        """Replicas that must hold a broadcast before it returns; 0: none awaited."""
        return self._settings.min_replicas

    @property
    def replica_timeout(self) -> float:
        """Seconds a broadcast waits for ``min_replicas``."""
        return self._settings.replica_timeout

    def __repr__(self) -> str:
        return (
            f"ReplayLog(url={self.url!r}, channel_prefix={self.channel_prefix!r}, "
            f"log_prefix={self.log_prefix!r})"
        )

    def broadcast(
        self,
        channel: str,
        event_name: str,
        content: Any,
        *,
        default: Default = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Publish on ``mq:<channel>`` and store in ``replay:<channel>`` in one atomic step.

        Returns the message's timestamp (ms, Redis clock), strictly greater than the channel's
        previous one, which is also its cursor for :meth:`unspool`. A retry with the same
        ``idempotency_key`` within ``idempotency_window_ms`` publishes nothing and returns
        the first timestamp.
        """
        return self._native.broadcast(
            channel, event_name, content, default or self.default, idempotency_key
        )

    def broadcast_many(
        self, items: Iterable[tuple[str, str, Any]], *, default: Default = None
    ) -> list[int]:
        """Broadcast many ``(channel, event_name, content)`` in one round trip.

        Every item is serialized before anything is sent, so one bad item writes nothing.
        Each message is its own atomic step; the timestamps come back in order.
        """
        return self._native.broadcast_many(list(items), default or self.default)

    def broadcast_on_commit(
        self,
        channel: str,
        event_name: str,
        content: Any,
        *,
        using: str | None = None,
        idempotency_key: str | None = None,
        default: Default = None,
    ) -> PendingBroadcast:
        """Django: :meth:`broadcast` once the transaction of database ``using`` commits.

        Never after a rollback; at once outside an atomic block, as ``transaction.on_commit``.
        The content is serialized now, so bad content raises here. Redis failures after the
        commit are logged and retried once with the same ``idempotency_key`` (a fresh one if
        None), never raised. Returns the scheduled broadcast, whose ``timestamp`` is set once
        it is published. See :mod:`replaylog.django.on_commit`.
        """
        from .django.on_commit import schedule

        return schedule(
            self,
            channel,
            event_name,
            content,
            using=using,
            idempotency_key=idempotency_key,
            default=default,
        )

    def unspool(
        self,
        channel: str,
        since: int | float | str = 0,
        *,
        raw: bool = False,
        limit: int | None = None,
    ) -> list[Any]:
        """The messages of ``channel`` with a timestamp greater than ``since``, oldest first.

        With ``raw=True`` the stored JSON strings come back untouched, ready to forward. At
        most ``limit`` (default: the ``replay_limit`` setting) come back, read in pages; use
        :meth:`replay` to learn whether more remain.
        """
        return self._read(channel, since, raw, limit, None, verdict=False).messages

    def replay(
        self,
        channel: str,
        since: int | float | str = 0,
        *,
        raw: bool = False,
        limit: int | None = None,
        epoch: str | None = None,
    ) -> Replay:
        """:meth:`unspool`, and whether the replay is complete.

        ``complete`` is False when a message newer than ``since`` existed but is gone: pruned,
        trimmed by ``max_len``, expired with its key, or lost to ``FLUSHALL`` or a restart.
        The client should then reload its state instead of trusting the replay. A client that
        kept the ``epoch`` of its last replay may pass it: a different epoch means the log's
        history was lost and replaced, and the replay is incomplete. ``more`` is True when
        ``limit`` (default: the ``replay_limit`` setting) cut it short: replay again from the
        last message's timestamp.
        """
        return self._read(channel, since, raw, limit, epoch, verdict=True)

    def unspool_many(
        self,
        cursors: Mapping[str, int | float | str],
        *,
        raw: bool = False,
        limit: int | None = None,
    ) -> dict[str, list[Any]]:
        """:meth:`unspool` for many ``{channel: since}`` at once, in one round trip (a channel
        with more than a page to read goes on with its own requests)."""
        limit = _paging.check_limit(limit, self.replay_limit)
        page = min(limit, _paging.PAGE) + 1
        result = self._native.unspool_many(_cursor_pairs(cursors), raw, page)
        for channel, messages in result.items():
            if len(messages) == page:
                result[channel] = self.unspool(channel, cursors[channel], raw=raw, limit=limit)
        return result

    def prune_replay_logs(
        self,
        expire_ms: int | None = None,
        *,
        channel: str | None = None,
        pattern: str | None = None,
    ) -> int:
        """Trim entries older than ``expire_ms`` (default: the setting) from every log.

        Walks the keyspace with SCAN, never KEYS, and pipelines the trims in batches.
        ``channel`` trims that one channel's log only; ``pattern``, a glob over channel names
        (``room:*``, Redis's SCAN MATCH syntax), the logs of the channels it matches.
        Returns how many entries it removed.
        """
        expire_ms = self._prune_expiry(expire_ms)
        one = _prune_target(channel, pattern)
        if one is not None:
            return self._native.prune_log(one, expire_ms)
        return self._native.prune(expire_ms, pattern)

    def delete_log(self, channel: str) -> int:
        """Delete ``channel``'s log and its bookkeeping; returns how many messages it held.

        Clients resuming from a cursor on it get an incomplete replay (a reset), and the next
        broadcast starts a new history.
        """
        return self._native.delete_log(channel)

    def subscribe(self, channels: str | Iterable[str], since: Since = None) -> Subscription:
        """Subscribe to ``channels``: every message after ``since`` first, then live ones.

        ``since`` is a cursor (a timestamp) for every channel, or a dict of channel to cursor
        or :class:`Position` (a subscription's ``position``: its epoch is checked too); None
        (or a channel left out of the dict) starts from now. Use it as a context manager
        and iterate; see :class:`Subscription`.
        """
        return Subscription(self._native.subscribe(subscription_requests(channels, since)))

    def asubscribe(self, channels: str | Iterable[str], since: Since = None) -> AsyncSubscription:
        """:meth:`subscribe` for asyncio: ``async with log.asubscribe(...) as sub``."""
        requests = subscription_requests(channels, since)
        return AsyncSubscription(lambda: _run_async(self._native.subscribe, requests))

    async def abroadcast(
        self,
        channel: str,
        event_name: str,
        content: Any,
        *,
        default: Default = None,
        idempotency_key: str | None = None,
    ) -> int:
        """:meth:`broadcast` without blocking the event loop."""
        return await _run_async(
            self._native.broadcast,
            channel,
            event_name,
            content,
            default or self.default,
            idempotency_key,
        )

    async def abroadcast_on_commit(
        self,
        channel: str,
        event_name: str,
        content: Any,
        *,
        using: str | None = None,
        idempotency_key: str | None = None,
        default: Default = None,
    ) -> PendingBroadcast:
        """:meth:`broadcast_on_commit` for async code.

        If the database ``using`` is in an atomic block on the thread where this request's
        synchronous ORM work runs (async code called through ``async_to_sync`` from inside
        ``transaction.atomic()``), the broadcast waits for its commit; otherwise it is published
        now, without blocking the event loop.
        """
        from .django.on_commit import aschedule

        return await aschedule(
            self,
            channel,
            event_name,
            content,
            using=using,
            idempotency_key=idempotency_key,
            default=default,
        )

    async def abroadcast_many(
        self, items: Iterable[tuple[str, str, Any]], *, default: Default = None
    ) -> list[int]:
        """:meth:`broadcast_many` without blocking the event loop."""
        return await _run_async(self._native.broadcast_many, list(items), default or self.default)

    async def aunspool(
        self,
        channel: str,
        since: int | float | str = 0,
        *,
        raw: bool = False,
        limit: int | None = None,
    ) -> list[Any]:
        """:meth:`unspool` without blocking the event loop."""
        return (await self._aread(channel, since, raw, limit, None, verdict=False)).messages

    async def aunspool_many(
        self,
        cursors: Mapping[str, int | float | str],
        *,
        raw: bool = False,
        limit: int | None = None,
    ) -> dict[str, list[Any]]:
        """:meth:`unspool_many` without blocking the event loop."""
        limit = _paging.check_limit(limit, self.replay_limit)
        page = min(limit, _paging.PAGE) + 1
        result = await _run_async(self._native.unspool_many, _cursor_pairs(cursors), raw, page)
        for channel, messages in result.items():
            if len(messages) == page:
                result[channel] = await self.aunspool(
                    channel, cursors[channel], raw=raw, limit=limit
                )
        return result

    async def areplay(
        self,
        channel: str,
        since: int | float | str = 0,
        *,
        raw: bool = False,
        limit: int | None = None,
        epoch: str | None = None,
    ) -> Replay:
        """:meth:`replay` without blocking the event loop."""
        return await self._aread(channel, since, raw, limit, epoch, verdict=True)

    async def aprune_replay_logs(
        self,
        expire_ms: int | None = None,
        *,
        channel: str | None = None,
        pattern: str | None = None,
    ) -> int:
        """:meth:`prune_replay_logs` without blocking the event loop."""
        expire_ms = self._prune_expiry(expire_ms)
        one = _prune_target(channel, pattern)
        if one is not None:
            return await _run_async(self._native.prune_log, one, expire_ms)
        return await _run_async(self._native.prune, expire_ms, pattern)

    async def adelete_log(self, channel: str) -> int:
        """:meth:`delete_log` without blocking the event loop."""
        return await _run_async(self._native.delete_log, channel)

    def close(self) -> None:
        """Drop this log's connection; the next call opens a new one."""
        self._native.close()

    def _read(
        self, channel: str, since: Any, raw: bool, limit: Any, epoch: Any, *, verdict: bool
    ) -> Replay:
        """Reads in pages: each with its verdict (a script) for ``replay``; else as ``unspool``
        always did, a plain range read, on the bulk connection when it can."""
        native = self._native

        def read(since: Any, n: int, epoch: str | None) -> _paging.Page:
            if verdict:
                return native.replay(channel, since, raw, n, epoch)
            return True, native.unspool(channel, since, raw, n), None

        return _paging.run(self._pages(since, limit, epoch), read)

    async def _aread(
        self, channel: str, since: Any, raw: bool, limit: Any, epoch: Any, *, verdict: bool
    ) -> Replay:
        """:meth:`_read` without blocking the event loop."""
        native = self._native

        async def read(since: Any, n: int, epoch: str | None) -> _paging.Page:
            if verdict:
                return await _run_async(native.replay, channel, since, raw, n, epoch)
            return True, await _run_async(native.unspool, channel, since, raw, n), None

        return await _paging.arun(self._pages(since, limit, epoch), read)

    def _pages(self, since: Any, limit: Any, epoch: Any) -> _paging.Pages:
        _check_epoch(epoch)
        return _paging.pages(since, _paging.check_limit(limit, self.replay_limit), epoch)

    def _prune_expiry(self, expire_ms: int | None) -> int:
        if expire_ms is None:
            return self.expire_ms
        return as_expire_ms("expire_ms", expire_ms)


def _cursor_pairs(cursors: Mapping[str, int | float | str]) -> list[tuple[str, Any]]:
    if not isinstance(cursors, Mapping):
        raise TypeError(f"cursors must be a mapping, got {type(cursors).__name__}")
    return list(cursors.items())


def _prune_target(channel: str | None, pattern: str | None) -> str | None:
    """The one channel to prune, or None for a prune by ``pattern`` (or of every log)."""
    if channel is not None and pattern is not None:
        raise TypeError("prune_replay_logs takes channel or pattern, not both")
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be str, not {type(pattern).__name__}")
    return channel


def _check_epoch(epoch: str | None) -> None:
    if epoch is not None and not isinstance(epoch, str):
        raise TypeError(f"epoch must be str, not {type(epoch).__name__}")


async def _run_async(method: Callable[..., Callable[[], None]], *args: Any) -> Any:
    """Runs a native method on the Rust runtime; the loop awaits a future it resolves.

    A cancelled await stops that work too: a request that has not reached Redis yet never
    does (one that has may still run: a cancelled write's outcome is unknown)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    cancel = method(*args, aio=(loop, future))
    try:
        return await future
    except asyncio.CancelledError:
        cancel()
        raise
