"""The default :class:`ReplayLog` and the module-level functions that use it.

It is built from settings on first use, never at import, and built again when a replaylog
setting of Django changes (``override_settings``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from . import _settings
from ._log import Default, ReplayLog
from ._paging import Replay
from ._subscription import AsyncSubscription, Since, Subscription

_default_log: ReplayLog | None = None
# What configure() was given: kept when a settings change rebuilds the default log.
_configured: dict[str, Any] = {}
_default_lock = threading.Lock()


def get_default() -> ReplayLog:
    """The :class:`ReplayLog` the module-level functions use, built from settings on first use."""
    log = _default_log
    if log is None:
        with _default_lock:
            log = _default_log
            if log is None:
                log = _install_default(ReplayLog(**_configured))
    return log


def configure(**settings: Any) -> ReplayLog:
    """Replace the default :class:`ReplayLog` with one built from ``settings`` (the arguments
    of :class:`ReplayLog`); what they leave out still comes from Django settings and the
    environment, also when those change."""
    global _configured
    with _default_lock:
        log = _install_default(ReplayLog(**settings))
        _configured = dict(settings)
        return log


def reset_default() -> None:
    """Forget the default log and what :func:`configure` set; the next module-level call
    builds it again from settings."""
    global _configured
    _configured = {}
    _drop_default()


def _drop_default() -> None:
    global _default_log
    with _default_lock:
        old, _default_log = _default_log, None
    if old is not None:
        old.close()


def _install_default(log: ReplayLog) -> ReplayLog:
    global _default_log
    old, _default_log = _default_log, log
    if old is not None:
        old.close()
    _watch_django_settings()
    return log


_watching_django = False


def _watch_django_settings() -> None:
    """Rebuild the default log when a replaylog setting changes (``override_settings``)."""
    global _watching_django
    if _watching_django or _settings._django_settings() is None:
        return
    from django.core.signals import setting_changed

    def on_setting_changed(setting: str, **kwargs: Any) -> None:
        if setting in _settings.SETTINGS:
            _drop_default()

    setting_changed.connect(on_setting_changed, weak=False, dispatch_uid="replaylog-settings")
    _watching_django = True


def broadcast(
    channel: str,
    event_name: str,
    content: Any,
    *,
    default: Default = None,
    idempotency_key: str | None = None,
) -> int:
    """:meth:`ReplayLog.broadcast` on the default log."""
    return get_default().broadcast(
        channel, event_name, content, default=default, idempotency_key=idempotency_key
    )


def replay(
    channel: str,
    since: int | float | str = 0,
    *,
    raw: bool = False,
    limit: int | None = None,
    epoch: str | None = None,
) -> Replay:
    """:meth:`ReplayLog.replay` on the default log."""
    return get_default().replay(channel, since, raw=raw, limit=limit, epoch=epoch)


def broadcast_many(items: Iterable[tuple[str, str, Any]], *, default: Default = None) -> list[int]:
    """:meth:`ReplayLog.broadcast_many` on the default log."""
    return get_default().broadcast_many(items, default=default)


def unspool(
    channel: str, since: int | float | str = 0, *, raw: bool = False, limit: int | None = None
) -> list[Any]:
    """:meth:`ReplayLog.unspool` on the default log."""
    return get_default().unspool(channel, since, raw=raw, limit=limit)


def unspool_many(
    cursors: Mapping[str, int | float | str], *, raw: bool = False, limit: int | None = None
) -> dict[str, list[Any]]:
    """:meth:`ReplayLog.unspool_many` on the default log."""
    return get_default().unspool_many(cursors, raw=raw, limit=limit)


def prune_replay_logs(
    expire_ms: int | None = None, *, channel: str | None = None, pattern: str | None = None
) -> int:
    """:meth:`ReplayLog.prune_replay_logs` on the default log."""
    return get_default().prune_replay_logs(expire_ms, channel=channel, pattern=pattern)


def delete_log(channel: str) -> int:
    """:meth:`ReplayLog.delete_log` on the default log."""
    return get_default().delete_log(channel)


def subscribe(channels: str | Iterable[str], since: Since = None) -> Subscription:
    """:meth:`ReplayLog.subscribe` on the default log."""
    return get_default().subscribe(channels, since)


def asubscribe(channels: str | Iterable[str], since: Since = None) -> AsyncSubscription:
    """:meth:`ReplayLog.asubscribe` on the default log."""
    return get_default().asubscribe(channels, since)


async def abroadcast(
    channel: str,
    event_name: str,
    content: Any,
    *,
    default: Default = None,
    idempotency_key: str | None = None,
) -> int:
    """:meth:`ReplayLog.abroadcast` on the default log."""
    return await get_default().abroadcast(
        channel, event_name, content, default=default, idempotency_key=idempotency_key
    )


async def abroadcast_many(
    items: Iterable[tuple[str, str, Any]], *, default: Default = None
) -> list[int]:
    """:meth:`ReplayLog.abroadcast_many` on the default log."""
    return await get_default().abroadcast_many(items, default=default)


async def aunspool(
    channel: str, since: int | float | str = 0, *, raw: bool = False, limit: int | None = None
) -> list[Any]:
    """:meth:`ReplayLog.aunspool` on the default log."""
    return await get_default().aunspool(channel, since, raw=raw, limit=limit)


async def aunspool_many(
    cursors: Mapping[str, int | float | str], *, raw: bool = False, limit: int | None = None
) -> dict[str, list[Any]]:
    """:meth:`ReplayLog.aunspool_many` on the default log."""
    return await get_default().aunspool_many(cursors, raw=raw, limit=limit)


async def areplay(
    channel: str,
    since: int | float | str = 0,
    *,
    raw: bool = False,
    limit: int | None = None,
    epoch: str | None = None,
) -> Replay:
    """:meth:`ReplayLog.areplay` on the default log."""
    return await get_default().areplay(channel, since, raw=raw, limit=limit, epoch=epoch)


async def aprune_replay_logs(
    expire_ms: int | None = None, *, channel: str | None = None, pattern: str | None = None
) -> int:
    """:meth:`ReplayLog.aprune_replay_logs` on the default log."""
    return await get_default().aprune_replay_logs(expire_ms, channel=channel, pattern=pattern)


async def adelete_log(channel: str) -> int:
    """:meth:`ReplayLog.adelete_log` on the default log."""
    return await get_default().adelete_log(channel)
