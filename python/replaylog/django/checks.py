"""Django system checks for the replaylog settings.

They validate the values replaylog would use (Django settings first, then the environment, as
:class:`replaylog.ReplayLog` resolves them) with replaylog's own converters, then resolve them
together into the frozen settings a log is built from (the rules between settings), and build the
native log from those, which parses the URL with the native module's parser. Building one connects
to nothing: the checks never touch Redis.

==================  =====================================================================
id                  reported when
==================  =====================================================================
``replaylog.E001``  ``EXPIRE_REPLAY_LOGS_MS`` is not a positive integer of milliseconds
``replaylog.E002``  ``REPLAYLOG_URL`` is not a redis://, rediss://, unix://,
                    redis+cluster:// or redis+sentinel:// URL, or its host, port,
                    database or options are malformed
``replaylog.E003``  ``REPLAYLOG_CONNECT_TIMEOUT`` is not a number of seconds in (0, 86400)
``replaylog.E004``  ``REPLAYLOG_RESPONSE_TIMEOUT`` is not a number of seconds in (0, 86400)
``replaylog.E005``  ``REPLAYLOG_CHANNEL_PREFIX`` is not a string
``replaylog.E006``  ``REPLAYLOG_LOG_PREFIX`` is not a string
``replaylog.E007``  ``REPLAYLOG_META_PREFIX`` is not a string
``replaylog.E008``  ``REPLAYLOG_IDEMPOTENCY_PREFIX`` is not a string
``replaylog.E009``  ``REPLAYLOG_MAX_LEN`` is not 0, None or a positive integer
``replaylog.E010``  ``REPLAYLOG_CLUSTER_KEYS`` is not a bool
``replaylog.E011``  ``REPLAYLOG_IDEMPOTENCY_WINDOW_MS`` is not a positive integer of ms
``replaylog.E013``  ``REPLAYLOG_BUSY_POLL_US`` is not an integer of µs from 0 to 10000
``replaylog.E014``  ``REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES`` is not a positive integer
``replaylog.E015``  ``REPLAYLOG_REPLAY_LIMIT`` is not a positive integer
``replaylog.E016``  ``REPLAYLOG_MIN_REPLICAS`` is not an integer from 0 to 100
``replaylog.E017``  ``REPLAYLOG_REPLICA_TIMEOUT`` is not a number of seconds
``replaylog.E018``  ``REPLAYLOG_SHARDED_PUBSUB`` is not a bool
``replaylog.E012``  each setting is valid but they do not work together (equal prefixes,
                    sharded pub/sub without a cluster URL, ...)
``replaylog.W001``  ``REPLAYLOG_LOG_PREFIX`` is empty, so a prune would scan every key
==================  =====================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable
from urllib.parse import urlsplit

from django.core import checks

from .. import _settings
from .._errors import ConfigurationError
from .._native import NativeLog

__all__ = ["CHECK_IDS", "check_settings"]


def _check_url(name: str, value: Any) -> str:
    """``as_url``, plus clear messages for the host, port and database number."""
    url = _settings.as_url(name, value)
    masked = _settings.mask_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:  # its message may quote the password
        raise ConfigurationError(f"{name} is malformed: {masked!r}") from None
    if parts.scheme in ("redis", "rediss") or parts.scheme.endswith(("+cluster", "+sentinel")):
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
    return url


# setting -> (check id, converter)
_CONVERTERS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "EXPIRE_REPLAY_LOGS_MS": ("replaylog.E001", _settings.as_expire_ms),
    "REPLAYLOG_URL": ("replaylog.E002", _check_url),
    "REPLAYLOG_CONNECT_TIMEOUT": ("replaylog.E003", _settings.as_seconds),
    "REPLAYLOG_RESPONSE_TIMEOUT": ("replaylog.E004", _settings.as_seconds),
    "REPLAYLOG_CHANNEL_PREFIX": ("replaylog.E005", _settings.as_prefix),
    "REPLAYLOG_LOG_PREFIX": ("replaylog.E006", _settings.as_prefix),
    "REPLAYLOG_META_PREFIX": ("replaylog.E007", _settings.as_prefix),
    "REPLAYLOG_IDEMPOTENCY_PREFIX": ("replaylog.E008", _settings.as_prefix),
    "REPLAYLOG_MAX_LEN": ("replaylog.E009", _settings.as_max_len),
    "REPLAYLOG_CLUSTER_KEYS": ("replaylog.E010", _settings.as_bool),
    "REPLAYLOG_IDEMPOTENCY_WINDOW_MS": ("replaylog.E011", _settings.as_expire_ms),
    "REPLAYLOG_BUSY_POLL_US": ("replaylog.E013", _settings.as_busy_poll_us),
    "REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES": ("replaylog.E014", _settings.as_positive_int),
    "REPLAYLOG_REPLAY_LIMIT": ("replaylog.E015", _settings.as_positive_int),
    "REPLAYLOG_MIN_REPLICAS": ("replaylog.E016", _settings.as_min_replicas),
    "REPLAYLOG_REPLICA_TIMEOUT": ("replaylog.E017", _settings.as_seconds),
    "REPLAYLOG_SHARDED_PUBSUB": ("replaylog.E018", _settings.as_bool),
}
_COMBINATION_ID = "replaylog.E012"

#: The check id of each setting (E012 and W001 are about combinations and the log prefix).
CHECK_IDS: dict[str, str] = {name: check_id for name, (check_id, _) in _CONVERTERS.items()}


def _source(name: str) -> str:
    from django.conf import settings

    if hasattr(settings, name):
        return f"settings.{name}"
    env_name = _settings.SETTINGS[name][0]
    if env_name in os.environ:
        return f"the environment variable {env_name}"
    return "the default"


def _error(message: str, name: str, check_id: str) -> checks.Error:
    return checks.Error(
        message,
        hint=f"Fix {_source(name)}; replaylog cannot be used until it is valid.",
        obj=name,
        id=check_id,
    )


def _build_error() -> tuple[str, str] | None:
    """Resolve the settings together and build the native log from them (no connection):
    (setting, message) of what fails; the setting is "" when no one setting is at fault."""
    try:
        settings = _settings.Settings.resolve()
    except _settings.URLMismatch as exc:
        return "REPLAYLOG_URL", f"REPLAYLOG_URL is not usable: {exc}"
    except ConfigurationError as exc:
        return "", str(exc)
    try:  # the URL, parsed as the native module parses it
        NativeLog(settings).close()
    except ConfigurationError as exc:
        return "REPLAYLOG_URL", f"REPLAYLOG_URL is not usable: {exc}"
    return None


def check_settings(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Validate every replaylog setting, offline; returns Django check messages."""
    messages: list[checks.CheckMessage] = []
    for name, (check_id, convert) in _CONVERTERS.items():
        try:
            value = convert(name, _settings.lookup(name))
        except ConfigurationError as exc:
            messages.append(_error(str(exc), name, check_id))
            continue
        if name == "REPLAYLOG_LOG_PREFIX" and value == "":
            messages.append(
                checks.Warning(
                    "REPLAYLOG_LOG_PREFIX is empty, so prune_replay_logs would scan every key "
                    "in the database.",
                    hint="Use a prefix such as 'replay:'.",
                    obj=name,
                    id="replaylog.W001",
                )
            )
    if not any(m.is_serious() for m in messages):
        failure = _build_error()
        if failure is not None:
            name, message = failure
            if name:
                messages.append(_error(message, name, CHECK_IDS[name]))
            else:
                messages.append(
                    checks.Error(
                        f"The replaylog settings do not work together: {message}",
                        hint="See the replaylog settings documentation.",
                        obj="replaylog",
                        id=_COMBINATION_ID,
                    )
                )
    return messages
