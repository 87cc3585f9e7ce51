"""The exceptions replaylog raises. The Rust core raises these same classes."""

from __future__ import annotations

import builtins


class ReplayLogError(Exception):
    """Base class of every error replaylog raises about Redis or its configuration."""


class ConnectionError(ReplayLogError, builtins.ConnectionError):  # noqa: A001
    """Redis could not be reached, or the connection dropped before a reply came."""


class TimeoutError(ConnectionError, builtins.TimeoutError):  # noqa: A001
    """Redis did not connect or answer within the configured timeout."""


class RedisRefusedError(ReplayLogError):
    """Redis refused the command; ``code`` is its error code, e.g. ``"OOM"``."""

    code: str = "ERR"


class OutOfMemoryError(RedisRefusedError):
    """Redis is over ``maxmemory`` with a ``noeviction`` policy and refuses writes."""

    code = "OOM"


class ReadOnlyError(RedisRefusedError):
    """The server is a read-only replica."""

    code = "READONLY"


class PermissionDeniedError(RedisRefusedError):
    """The ACL user lacks a permission the command needs."""

    code = "NOPERM"


class ReplicationError(ReplayLogError):
    """A broadcast is stored and published on the master, but fewer replicas than
    ``min_replicas`` acknowledged it within ``replica_timeout``: it may not survive a failover.

    ``timestamps`` are the messages' (one for ``broadcast``), ``acknowledged`` how many
    replicas had them. A retry with the same ``idempotency_key`` does not publish twice.
    """

    def __init__(self, timestamps: list[int], acknowledged: int, wanted: int, timeout_ms: int):
        super().__init__(
            f"stored and published on the master, but {acknowledged} of {wanted} replicas "
            f"acknowledged it within {timeout_ms} ms: it may not survive a failover"
        )
        self.timestamps = timestamps
        self.acknowledged = acknowledged


class ConfigurationError(ReplayLogError, ValueError):
    """A setting (URL, expiry, timeout, prefix) is malformed."""


class IncompleteReplayError(ReplayLogError):
    """A subscription could not replay everything after its cursor on ``channel``.

    Messages after ``since`` were removed (pruned, trimmed, expired, flushed) before they could
    be delivered. Reload the channel's state, then keep iterating: the subscription goes on
    with the messages that follow.

    The subscription goes on from ``resume``, the channel's newest timestamp when the gap was
    found, in the history named ``epoch``: its position now (see ``Subscription.position``).
    """

    def __init__(
        self, channel: str, since: int, resume: int | None = None, epoch: str | None = None
    ) -> None:
        super().__init__(
            f"messages on {channel!r} after {since} are gone; reload the channel's state"
        )
        self.channel = channel
        self.since = since
        self.resume = resume
        self.epoch = epoch


# They read as replaylog.ConnectionError and so on in tracebacks: the names users catch.
for _error in list(globals().values()):
    if isinstance(_error, type) and issubclass(_error, ReplayLogError):
        _error.__module__ = "replaylog"
