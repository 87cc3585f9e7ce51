"""Django system checks for the replaylog settings.

They validate the values replaylog would use (Django settings first, then the environment, as
:class:`replaylog.ReplayLog` resolves them) with the same converters, and the URL also with the
native module's own parser. They never connect to Redis.

========================  ==============================================================
id                        reported when
========================  ==============================================================
``replaylog.E001``        ``EXPIRE_REPLAY_LOGS_MS`` is not a positive integer of ms
``replaylog.E002``        ``REPLAYLOG_URL`` is not a redis://, rediss:// or unix:// URL,
                          or its host, port or database number is malformed
``replaylog.E003``        ``REPLAYLOG_CONNECT_TIMEOUT`` is not a number of seconds in (0, 86400)
``replaylog.E004``        ``REPLAYLOG_RESPONSE_TIMEOUT`` is not a number of seconds in (0, 86400)
``replaylog.E005``        ``REPLAYLOG_CHANNEL_PREFIX`` is not a string
``replaylog.E006``        ``REPLAYLOG_LOG_PREFIX`` is not a string
``replaylog.W001``        ``REPLAYLOG_LOG_PREFIX`` is empty, so a prune would scan every key
========================  ==============================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable
from urllib.parse import urlsplit

from django.core import checks

from .. import ReplayLog, _settings
from .._errors import ConfigurationError

__all__ = ["CHECK_IDS", "check_settings"]


def _check_url(name: str, value: Any) -> str:
    """``as_url``, plus the host, port and database number that redis-rs will parse."""
    url = _settings.as_url(name, value)
    masked = _settings.mask_url(url)
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            raise ConfigurationError(f"{name} has a malformed port: {masked!r}")
        if not parts.hostname:
            raise ConfigurationError(f"{name} has no host: {masked!r}")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"{name} has a malformed database number: {masked!r}")
    elif not parts.path:
        raise ConfigurationError(f"{name} has no socket path: {masked!r}")
    # Last, the parser the runtime itself uses (redis-rs, in the native module). Building a
    # ReplayLog connects to nothing; every other setting is given so only the URL is judged.
    try:
        ReplayLog(
            url,
            expire_ms=1,
            connect_timeout=1.0,
            response_timeout=1.0,
            channel_prefix="mq:",
            log_prefix="replay:",
        ).close()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name} is not usable: {exc}") from None
    return url


# setting -> (check id, converter)
_CONVERTERS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "EXPIRE_REPLAY_LOGS_MS": ("replaylog.E001", _settings.as_expire_ms),
    "REPLAYLOG_URL": ("replaylog.E002", _check_url),
    "REPLAYLOG_CONNECT_TIMEOUT": ("replaylog.E003", _settings.as_seconds),
    "REPLAYLOG_RESPONSE_TIMEOUT": ("replaylog.E004", _settings.as_seconds),
    "REPLAYLOG_CHANNEL_PREFIX": ("replaylog.E005", _settings.as_prefix),
    "REPLAYLOG_LOG_PREFIX": ("replaylog.E006", _settings.as_prefix),
}

#: Every id these checks can report, by setting (``W001`` is about ``REPLAYLOG_LOG_PREFIX``).
CHECK_IDS: dict[str, str] = {name: check_id for name, (check_id, _) in _CONVERTERS.items()}


def _source(name: str) -> str:
    from django.conf import settings

    if hasattr(settings, name):
        return f"settings.{name}"
    env_name = _settings.SETTINGS[name][0]
    if env_name in os.environ:
        return f"the environment variable {env_name}"
    return "the default"


def check_settings(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Validate every replaylog setting, offline; returns Django check messages."""
    messages: list[checks.CheckMessage] = []
    for name, (check_id, convert) in _CONVERTERS.items():
        try:
            value = convert(name, _settings.lookup(name))
        except ConfigurationError as exc:
            messages.append(
                checks.Error(
                    str(exc),
                    hint=f"Fix {_source(name)}; replaylog cannot be used until it is valid.",
                    obj=name,
                    id=check_id,
                )
            )
            continue
        if name == "REPLAYLOG_LOG_PREFIX" and value == "":
            messages.append(
                checks.Warning(
                    "REPLAYLOG_LOG_PREFIX is empty, so prune_replay_logs would scan and trim "
                    "every key in the database.",
                    hint="Use a prefix such as 'replay:'.",
                    obj=name,
                    id="replaylog.W001",
                )
            )
    return messages
