"""Settings: each explicit argument, else Django settings, then the environment, then defaults;
resolved once per log into a frozen :class:`Settings`."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from itertools import groupby
from operator import itemgetter
from typing import Any, Callable
from urllib.parse import unquote_plus

from ._errors import ConfigurationError

DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_EXPIRE_MS = 3_600_000
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_RESPONSE_TIMEOUT = 5.0
DEFAULT_CHANNEL_PREFIX = "mq:"
DEFAULT_LOG_PREFIX = "replay:"
DEFAULT_META_PREFIX = "replaymeta:"
DEFAULT_IDEMPOTENCY_PREFIX = "replayonce:"
DEFAULT_IDEMPOTENCY_WINDOW_MS = 300_000
# Off: polling spends a CPU on every wait, which the other workers of a busy host need (see
# ReplayLog's busy_poll_us and the README's "Busy polling").
DEFAULT_BUSY_POLL_US = 0
MAX_BUSY_POLL_US = 10_000
# Bytes a subscription holds for a consumer that lags before it lets go and reads the log
# later: the default of Redis's own soft limit for pub/sub clients.
DEFAULT_SUBSCRIPTION_BUFFER_BYTES = 8 * 1024 * 1024
# Messages one unspool or replay returns when it is given no limit: a client's cursor must not
# make one call read a million entries.
DEFAULT_REPLAY_LIMIT = 10_000
DEFAULT_REPLICA_TIMEOUT = 1.0

# setting name -> (environment variable, default)
SETTINGS: dict[str, tuple[str, Any]] = {
    "REPLAYLOG_URL": ("REPLAYLOG_URL", DEFAULT_URL),
    "EXPIRE_REPLAY_LOGS_MS": ("EXPIRE_REPLAY_LOGS_MS", DEFAULT_EXPIRE_MS),
    "REPLAYLOG_CONNECT_TIMEOUT": ("REPLAYLOG_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
    "REPLAYLOG_RESPONSE_TIMEOUT": ("REPLAYLOG_RESPONSE_TIMEOUT", DEFAULT_RESPONSE_TIMEOUT),
    "REPLAYLOG_BUSY_POLL_US": ("REPLAYLOG_BUSY_POLL_US", DEFAULT_BUSY_POLL_US),
    "REPLAYLOG_CHANNEL_PREFIX": ("REPLAYLOG_CHANNEL_PREFIX", DEFAULT_CHANNEL_PREFIX),
    "REPLAYLOG_LOG_PREFIX": ("REPLAYLOG_LOG_PREFIX", DEFAULT_LOG_PREFIX),
    "REPLAYLOG_META_PREFIX": ("REPLAYLOG_META_PREFIX", DEFAULT_META_PREFIX),
    "REPLAYLOG_IDEMPOTENCY_PREFIX": ("REPLAYLOG_IDEMPOTENCY_PREFIX", DEFAULT_IDEMPOTENCY_PREFIX),
    "REPLAYLOG_MAX_LEN": ("REPLAYLOG_MAX_LEN", 0),
    "REPLAYLOG_CLUSTER_KEYS": ("REPLAYLOG_CLUSTER_KEYS", False),
    "REPLAYLOG_SHARDED_PUBSUB": ("REPLAYLOG_SHARDED_PUBSUB", False),
    "REPLAYLOG_IDEMPOTENCY_WINDOW_MS": (
        "REPLAYLOG_IDEMPOTENCY_WINDOW_MS",
        DEFAULT_IDEMPOTENCY_WINDOW_MS,
    ),
    "REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES": (
        "REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES",
        DEFAULT_SUBSCRIPTION_BUFFER_BYTES,
    ),
    "REPLAYLOG_REPLAY_LIMIT": ("REPLAYLOG_REPLAY_LIMIT", DEFAULT_REPLAY_LIMIT),
    "REPLAYLOG_MIN_REPLICAS": ("REPLAYLOG_MIN_REPLICAS", 0),
    "REPLAYLOG_REPLICA_TIMEOUT": ("REPLAYLOG_REPLICA_TIMEOUT", DEFAULT_REPLICA_TIMEOUT),
}


def _django_settings() -> Any | None:
    """Django's settings object when Django is imported and configured; never imports Django."""
    if "django.conf" not in sys.modules:
        return None
    settings = sys.modules["django.conf"].settings
    # With DJANGO_SETTINGS_MODULE set, settings load on first access, not before.
    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        return settings
    return None


def lookup(name: str) -> Any:
    """The raw value of a setting, from Django, the environment or the default, in that order."""
    env_name, default = SETTINGS[name]
    django_settings = _django_settings()
    if django_settings is not None and hasattr(django_settings, name):
        return getattr(django_settings, name)
    if env_name in os.environ:
        return os.environ[env_name]
    return default


def resolve(name: str, explicit: Any, convert: Callable[[str, Any], Any]) -> Any:
    return convert(name, lookup(name) if explicit is None else explicit)


def as_url(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty string, got {type(value).__name__}")
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"{name} must be a redis://, rediss://, unix://, redis+cluster:// or "
            f"redis+sentinel:// URL, got {mask_url(value)!r}"
        )
    return value


_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis+cluster", "rediss+cluster")


# Far beyond any real use (about 3 centuries of milliseconds), and small enough that Redis
# and its Lua scripts handle every derived figure (twice it, as an expiry) exactly.
MAX_SETTING = 10**13


def as_expire_ms(name: str, value: Any) -> int:
    """A positive integer, e.g. of milliseconds; numeric strings are accepted."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a positive integer of milliseconds, got a bool")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigurationError(
                f"{name} must be a positive integer of milliseconds, got {value!r}"
            ) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"{name} must be a positive integer of milliseconds, got {value!r}"
        )
    if value > MAX_SETTING:
        raise ConfigurationError(f"{name} must be at most {MAX_SETTING}, got {value!r}")
    return value


def as_positive_int(name: str, value: Any) -> int:
    """A positive integer (a count, a size in bytes); numeric strings are accepted."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SETTING:
        raise ConfigurationError(
            f"{name} must be a positive integer up to {MAX_SETTING}, got {value!r}"
        )
    return value


def as_min_replicas(name: str, value: Any) -> int:
    """A count of replicas, 0 (the default: none awaited) to 100."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ConfigurationError(f"{name} must be an integer from 0 to 100, got {value!r}")
    return value


def as_max_len(name: str, value: Any) -> int:
    """A cap on entries per log; 0 or None means no cap."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip() in ("", "0"):
        return 0
    if value == 0 and not isinstance(value, bool):
        return 0
    return as_expire_ms(name, value)


def as_busy_poll_us(name: str, value: Any) -> int:
    """Microseconds, 0 (never poll) to MAX_BUSY_POLL_US; numeric strings are accepted."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (0 <= value <= MAX_BUSY_POLL_US)
    ):
        raise ConfigurationError(
            f"{name} must be an integer of microseconds from 0 to {MAX_BUSY_POLL_US}, got {value!r}"
        )
    return value


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{name} must be a bool, got {value!r}")


def as_seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not (0 < seconds < 86_400):
        raise ConfigurationError(f"{name} must be between 0 and 86400 seconds, got {value!r}")
    return seconds


def as_prefix(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")
    return value


class URLMismatch(ConfigurationError):
    """The URL does not fit the other settings (sharded pub/sub without a cluster, ...)."""


@dataclass(frozen=True)
class Settings:
    """A log's settings, resolved once (see :meth:`resolve`); the native log reads them by name."""

    url: str = field(repr=False)  # may hold a password; see masked_url
    expire_ms: int
    """The logs' time to live after their last message, and a prune's default age limit."""
    expire_ms_from_setting: bool
    """Whether ``expire_ms`` came from ``EXPIRE_REPLAY_LOGS_MS``, which a prune reads again."""
    connect_timeout: float
    response_timeout: float
    busy_poll_us: int
    """A synchronous call alone in its process polls this long for the reply before it sleeps:
    a latency option that spends CPU to skip the OS wake-up (off by default)."""
    channel_prefix: str
    log_prefix: str
    meta_prefix: str
    idempotency_prefix: str
    max_len: int
    cluster_keys: bool
    sharded_pubsub: bool
    """SPUBLISH/SSUBSCRIBE on a cluster: each message goes to its channel's shard only."""
    idempotency_window_ms: int
    subscription_buffer_bytes: int
    """A subscription whose consumer lags holds at most this much (and 10,000 messages), then
    lets go of its connection and reads the log once the consumer catches up."""
    replay_limit: int
    min_replicas: int
    """A broadcast returns once this many replicas hold it (WAIT), so that a failover cannot
    lose it; else it raises ReplicationError after ``replica_timeout`` seconds."""
    replica_timeout: float

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @classmethod
    def resolve(
        cls,
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
    ) -> Settings:
        """Each argument, or where it is None its setting (see :func:`lookup`), converted and
        checked against the others. Raises :class:`ConfigurationError` (:class:`URLMismatch`
        when the URL is what does not fit)."""
        settings = cls(
            url=resolve("REPLAYLOG_URL", url, as_url),
            expire_ms=(
                resolve("EXPIRE_REPLAY_LOGS_MS", None, as_expire_ms)
                if expire_ms is None
                else as_expire_ms("expire_ms", expire_ms)
            ),
            expire_ms_from_setting=expire_ms is None,
            connect_timeout=resolve("REPLAYLOG_CONNECT_TIMEOUT", connect_timeout, as_seconds),
            response_timeout=resolve("REPLAYLOG_RESPONSE_TIMEOUT", response_timeout, as_seconds),
            busy_poll_us=resolve("REPLAYLOG_BUSY_POLL_US", busy_poll_us, as_busy_poll_us),
            channel_prefix=resolve("REPLAYLOG_CHANNEL_PREFIX", channel_prefix, as_prefix),
            log_prefix=resolve("REPLAYLOG_LOG_PREFIX", log_prefix, as_prefix),
            meta_prefix=resolve("REPLAYLOG_META_PREFIX", meta_prefix, as_prefix),
            idempotency_prefix=resolve(
                "REPLAYLOG_IDEMPOTENCY_PREFIX", idempotency_prefix, as_prefix
            ),
            max_len=resolve("REPLAYLOG_MAX_LEN", max_len, as_max_len),
            cluster_keys=resolve("REPLAYLOG_CLUSTER_KEYS", cluster_keys, as_bool),
            sharded_pubsub=resolve("REPLAYLOG_SHARDED_PUBSUB", sharded_pubsub, as_bool),
            idempotency_window_ms=resolve(
                "REPLAYLOG_IDEMPOTENCY_WINDOW_MS", idempotency_window_ms, as_expire_ms
            ),
            subscription_buffer_bytes=resolve(
                "REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES", subscription_buffer_bytes, as_positive_int
            ),
            replay_limit=resolve("REPLAYLOG_REPLAY_LIMIT", replay_limit, as_positive_int),
            min_replicas=resolve("REPLAYLOG_MIN_REPLICAS", min_replicas, as_min_replicas),
            replica_timeout=resolve("REPLAYLOG_REPLICA_TIMEOUT", replica_timeout, as_seconds),
        )
        if settings.min_replicas and settings.replica_timeout >= settings.response_timeout:
            raise ConfigurationError(
                "replica_timeout must be shorter than response_timeout: the WAIT for replicas "
                "is one request"
            )
        if settings.log_prefix in (settings.meta_prefix, settings.idempotency_prefix):
            raise ConfigurationError(
                "log_prefix must differ from meta_prefix and idempotency_prefix"
            )
        if is_cluster_url(settings.url):
            # A cluster runs each script on one slot: every key of a channel carries its tag.
            if cluster_keys is False:
                raise URLMismatch("a redis+cluster:// URL needs cluster_keys")
            return replace(settings, cluster_keys=True)
        if settings.sharded_pubsub:
            raise URLMismatch("sharded_pubsub needs a redis+cluster:// URL")
        return settings


# Query parameters that hold a password: redis-rs reads ``pass`` (for unix sockets), redis-py
# ``password``, replaylog's own ``sentinel_password`` the sentinels' one.
_PASSWORD_PARAMS = ("pass", "password", "sentinel_password")
# redis-rs's URL parser drops these wherever they are, so they never delimit anything.
_DROPPED_CHARACTERS = str.maketrans("", "", "\t\n\r")
# A "://" further on may be in the password.
_SCHEME = re.compile(r"[\x00-\x20]*[a-zA-Z][a-zA-Z0-9+.-]*://")


def mask_url(url: str) -> str:
    """The URL with every part that may hold a password replaced by ``***``, for messages and reprs.

    A password with an unencoded "/", "?", "#" or "@" is read one way by redis-rs, whose userinfo
    ends before the first "/", "?" or "#", and another by whoever wrote it, for whom it ends at
    the last "@"; so is a malformed URL. Both readings are masked.
    """
    url = url.translate(_DROPPED_CHARACTERS)
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    delimiters = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    authority_end = min(delimiters, default=len(url))
    userinfo_ends = {url.rfind("@", start, authority_end), url.rfind("@", start)} - {-1}
    secret_spans: list[tuple[int, int]] = []
    for userinfo_end in userinfo_ends:
        # Without a ":", the userinfo is a user name or a token: hide it all.
        password_start = url.find(":", start, userinfo_end) + 1 or start
        secret_spans.append((password_start, userinfo_end))
    for location_start in {start} | {end + 1 for end in userinfo_ends}:
        secret_spans += _query_secrets(url, location_start)
    hidden = [False] * len(url)
    for secret_start, secret_end in secret_spans:
        hidden[secret_start:secret_end] = [True] * (secret_end - secret_start)
    return "".join(
        "***" if hide else "".join(c for _, c in run)
        for hide, run in groupby(zip(hidden, url), key=itemgetter(0))
    )


def _query_secrets(url: str, location_start: int) -> list[tuple[int, int]]:
    """The spans of password values in the query that follows ``location_start``."""
    fragment = url.find("#", location_start)
    query_end = fragment if fragment >= 0 else len(url)
    query = url.find("?", location_start, query_end)
    if query < 0:
        return []
    spans = []
    in_password = False
    position = query + 1
    for param in url[query + 1 : query_end].split("&"):
        name, equals, _ = param.partition("=")
        if equals and unquote_plus(name).lower() in _PASSWORD_PARAMS:
            spans.append((position + len(name) + 1, position + len(param)))
            in_password = True
        elif in_password and not equals:
            # Not a parameter: the rest of a password with an unencoded "&".
            spans.append((position - 1, position + len(param)))
        else:
            in_password = False
        position += len(param) + 1
    if in_password and fragment >= 0 and url[fragment + 1 :] != "insecure":
        # The rest of a password with an unencoded "#".
        spans.append((fragment, len(url)))
    return spans
