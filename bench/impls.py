"""The three implementations, behind one small interface.

Each has ``broadcast``, ``broadcast_many`` (``None`` where it has none), ``unspool``,
``unspool_raw``, ``prune`` and ``close``. All share one client object across threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import orjson
import redis
from redis.exceptions import NoScriptError
from redis.utils import HIREDIS_AVAILABLE

import replaylog

LUA = Path(__file__).resolve().parent.parent / "src" / "lua"
BROADCAST_LUA = LUA / "broadcast.lua"
POOL_SIZE = 8


def redis_client(url: str) -> redis.Redis:
    """One redis-py client whose pool holds a connection per benchmark thread."""
    pool = redis.ConnectionPool.from_url(url, max_connections=POOL_SIZE)
    return redis.Redis(connection_pool=pool)


def require_hiredis() -> None:
    """redis-py parses replies with hiredis whenever it is importable; the peers need it."""
    if not HIREDIS_AVAILABLE:
        raise SystemExit("bench: hiredis is not installed (pip install 'redis[hiredis]')")


class Article:
    """The blog post's code, on redis-py 5+ (``zadd`` now takes a mapping)."""

    name = "article"
    has_broadcast_many = True  # emulated: one non-transactional pipeline of PUBLISH + ZADD
    broadcast_many_note = "emulated: pipelined PUBLISH+ZADD, no atomicity"

    def __init__(self, url: str, expire_ms: int) -> None:
        self.db = redis_client(url)
        self.expire_ms = expire_ms

    def broadcast(self, channel: str, event_name: str, content: Any) -> int:
        timestamp = int(time.time() * 1000)
        flattened = json.dumps(
            {"event_name": event_name, "content": content, "timestamp": timestamp}
        )
        self.db.publish(f"mq:{channel}", flattened)
        self.db.zadd(f"replay:{channel}", {flattened: timestamp})
        return timestamp

    def broadcast_many(self, items: list[tuple[str, str, Any]]) -> list[int]:
        pipe = self.db.pipeline(transaction=False)
        timestamps = []
        for channel, event_name, content in items:
            timestamp = int(time.time() * 1000)
            flattened = json.dumps(
                {"event_name": event_name, "content": content, "timestamp": timestamp}
            )
            pipe.publish(f"mq:{channel}", flattened)
            pipe.zadd(f"replay:{channel}", {flattened: timestamp})
            timestamps.append(timestamp)
        pipe.execute()
        return timestamps

    def unspool(self, channel: str, since: int) -> list[Any]:
        messages = self.db.zrangebyscore(f"replay:{channel}", f"({since}", "+inf")
        return [json.loads(message) for message in messages]

    def unspool_raw(self, channel: str, since: int) -> list[str]:
        messages = self.db.zrangebyscore(f"replay:{channel}", f"({since}", "+inf")
        return [message.decode() for message in messages]

    def prune(self) -> int:
        log_keys = self.db.keys("replay:*")
        oldest = int(time.time() * 1000) - self.expire_ms
        removed = 0
        for key in log_keys:
            removed += self.db.zremrangebyscore(key, 0, oldest)
        return removed

    def close(self) -> None:
        self.db.close()
        self.db.connection_pool.disconnect()


class Peer:
    """replaylog's semantics in good Python: its Lua scripts by EVALSHA, orjson, SCAN prune.

    Sends the scripts exactly the keys and arguments that src/store.rs sends.
    """

    name = "peer"
    has_broadcast_many = True
    broadcast_many_note = ""
    scan_count = 1000
    max_len = 0  # replaylog's default: no cap
    idempotency_window_ms = 300_000

    def __init__(self, url: str, expire_ms: int) -> None:
        self.db = redis_client(url)
        self.expire_ms = expire_ms
        self.scripts = {"broadcast": (LUA / "broadcast.lua").read_text()}
        self.sha = {name: self.db.script_load(text) for name, text in self.scripts.items()}
        self.tail = self.tail_for(expire_ms)

    @classmethod
    def tail_for(cls, expire_ms: int) -> tuple[Any, ...]:
        """The broadcast script's arguments after the head, the same for every message."""
        return (expire_ms, cls.max_len, cls.idempotency_window_ms)

    @staticmethod
    def script_keys(channel: str) -> tuple[int, str, str, str]:
        """broadcast.lua's KEYS for a channel, with their count: the log, its bookkeeping and
        the writing master's mark."""
        return (
            3,
            "replay:" + channel,
            "replaymeta:" + channel,
            f"replayonce:{len(channel)}:{channel}",
        )

    @staticmethod
    def head(event_name: str, content: Any) -> bytes:
        """The message's head, as src/message.rs (the format's one definition) makes it; the
        broadcast script adds the tail."""
        return b"".join(
            (b'{"event_name":', orjson.dumps(event_name), b',"content":', orjson.dumps(content))
        )

    def _evalsha(self, target: Any, name: str, *args: Any) -> Any:
        return target.execute_command("EVALSHA", self.sha[name], *args)

    def _reload(self, name: str) -> None:
        self.sha[name] = self.db.script_load(self.scripts[name])

    def broadcast(self, channel: str, event_name: str, content: Any) -> int:
        args = (
            *self.script_keys(channel),
            "mq:" + channel,
            self.head(event_name, content),
            *self.tail,
        )
        try:
            return self._evalsha(self.db, "broadcast", *args)
        except NoScriptError:  # the script cache was flushed; nothing ran
            self._reload("broadcast")
            return self._evalsha(self.db, "broadcast", *args)

    def broadcast_many(self, items: list[tuple[str, str, Any]]) -> list[int]:
        # Serialize everything first: one bad item raises before anything is sent.
        commands = [
            (
                *self.script_keys(channel),
                "mq:" + channel,
                self.head(event_name, content),
                *self.tail,
            )
            for channel, event_name, content in items
        ]
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        for attempt in range(2):
            pipe = self.db.pipeline(transaction=False)
            for index in pending:
                self._evalsha(pipe, "broadcast", *commands[index])
            replies = pipe.execute(raise_on_error=False)
            retry = []
            for index, reply in zip(pending, replies):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    retry.append(index)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[index] = reply
            if not retry:
                break
            self._reload("broadcast")
            pending = retry
        return results

    def unspool(self, channel: str, since: int) -> list[Any]:
        messages = self.db.execute_command(
            "ZRANGEBYSCORE", "replay:" + channel, f"({since}", "+inf"
        )
        loads = orjson.loads
        return [loads(message) for message in messages]

    def unspool_raw(self, channel: str, since: int) -> list[str]:
        messages = self.db.execute_command(
            "ZRANGEBYSCORE", "replay:" + channel, f"({since}", "+inf"
        )
        return [message.decode() for message in messages]

    def prune(self) -> int:
        """SCAN a step at a time; each step's trims travel with the next SCAN."""
        seconds, micros = self.db.time()
        oldest_kept = seconds * 1000 + micros // 1000 - self.expire_ms
        removed = 0
        cursor: int | None = 0
        keys: list[bytes] = []
        while cursor is not None or keys:
            pipe = self.db.pipeline(transaction=False)
            for key in keys:
                pipe.zremrangebyscore(key, "-inf", oldest_kept)
            if cursor is not None:
                pipe.scan(cursor, match="replay:*", count=self.scan_count, _type="zset")
            replies = pipe.execute()
            scanned = replies.pop() if cursor is not None else None
            removed += sum(replies)
            keys = []
            cursor = None
            if scanned is not None:
                position, keys = scanned
                cursor = position or None
        return removed

    def close(self) -> None:
        self.db.close()
        self.db.connection_pool.disconnect()


class Native:
    """replaylog itself, through its public Python API, with its default settings."""

    name = "replaylog"
    has_broadcast_many = True
    broadcast_many_note = ""
    busy_poll_us: int | None = None  # the default

    def __init__(self, url: str, expire_ms: int) -> None:
        self.log = replaylog.ReplayLog(url, expire_ms=expire_ms, busy_poll_us=self.busy_poll_us)
        self.broadcast: Callable[[str, str, Any], int] = self.log.broadcast
        self.broadcast_many: Callable[[list[tuple[str, str, Any]]], list[int]] | None = (
            self.log.broadcast_many
        )

    def unspool(self, channel: str, since: int) -> list[Any]:
        return self.log.unspool(channel, since)

    def unspool_raw(self, channel: str, since: int) -> list[str]:
        return self.log.unspool(channel, since, raw=True)

    def prune(self) -> int:
        return self.log.prune_replay_logs()

    def close(self) -> None:
        self.log.close()


class NativePolling(Native):
    """replaylog with busy polling on, at the budget that was the default before issue 13."""

    name = "replaylog, busy_poll_us=200"
    busy_poll_us = 200


IMPLEMENTATIONS = (Article, Peer, Native)
# Measured beside replaylog in the workloads that polling changes.
POLLING = NativePolling


def make(name: str, url: str, expire_ms: int) -> Any:
    """The implementation called ``name``, connected to ``url``."""
    for cls in (*IMPLEMENTATIONS, POLLING):
        if cls.name == name:
            return cls(url, expire_ms)
    raise ValueError(f"no implementation called {name!r}")
