"""replaylog: the article's Redis replay log (broadcast, unspool, prune), done right, in Rust.

The module-level functions use a default :class:`ReplayLog`, built on first use, never at import.
Where things live: ``_log`` (:class:`ReplayLog`), ``_default`` (the default log and the
module-level functions), ``_settings`` (settings lookup and the frozen :class:`Settings`),
``_subscription``, ``_paging``, ``_errors``, ``_aio`` and ``_process`` (asyncio and process hooks).
"""

from __future__ import annotations

# _aio is imported now, not by the Rust core on first use from its own thread: an import
# that a fork cut short would leave the child unable to finish any asyncio call. _process
# installs the exit and fork hooks.
from . import _aio, _process  # noqa: F401
from ._default import (
    abroadcast,
    abroadcast_many,
    adelete_log,
    aprune_replay_logs,
    areplay,
    asubscribe,
    aunspool,
    aunspool_many,
    broadcast,
    broadcast_many,
    configure,
    delete_log,
    get_default,
    prune_replay_logs,
    replay,
    reset_default,
    subscribe,
    unspool,
    unspool_many,
)
from ._errors import (
    ConfigurationError,
    ConnectionError,
    IncompleteReplayError,
    OutOfMemoryError,
    PermissionDeniedError,
    ReadOnlyError,
    RedisRefusedError,
    ReplayLogError,
    ReplicationError,
    TimeoutError,
)
from ._log import ReplayLog
from ._paging import Replay
from ._subscription import AsyncSubscription, Position, Subscription

__all__ = [
    "AsyncSubscription",
    "ConfigurationError",
    "ConnectionError",
    "IncompleteReplayError",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "Position",
    "ReadOnlyError",
    "RedisRefusedError",
    "Replay",
    "Subscription",
    "ReplayLog",
    "ReplayLogError",
    "ReplicationError",
    "TimeoutError",
    "abroadcast",
    "abroadcast_many",
    "adelete_log",
    "aprune_replay_logs",
    "areplay",
    "asubscribe",
    "aunspool",
    "aunspool_many",
    "broadcast",
    "broadcast_many",
    "configure",
    "delete_log",
    "get_default",
    "prune_replay_logs",
    "replay",
    "reset_default",
    "subscribe",
    "unspool",
    "unspool_many",
]
