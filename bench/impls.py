"""The three implementations, behind one small interface.

Each has ``broadcast``, ``broadcast_many`` (``None`` where it has none), ``unspool``,
``unspool_raw``, ``prune`` and ``close``. All share one client object across threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import redis
from redis.exceptions import NoScriptError
from redis.utils import HIREDIS_AVAILABLE

import replaylog

BROADCAST_LUA = Path(__file__).resolve().parent.parent / "src" / "lua" / "broadcast.lua"
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
    """replaylog's semantics in good Python: one Lua script by EVALSHA, orjson, SCAN prune."""

    name = "peer"
    has_broadcast_many = True
    broadcast_many_note = ""
    scan_count = 1000

    def __init__(self, url: str, expire_ms: int) -> None:
        self.db = redis_client(url)
        self.expire_ms = expire_ms
        self.script = BROADCAST_LUA.read_text()
        self.sha = self.db.script_load(self.script)

    @staticmethod
    def _head(event_name: str, content: Any) -> bytes:
        # The message JSON up to its timestamp; the script appends the timestamp and "}".
        return b"".join(
            (
                b'{"event_name":',
                orjson.dumps(event_name),
                b',"content":',
                orjson.dumps(content),
                b',"timestamp":',
            )
        )

    def broadcast(self, channel: str, event_name: str, content: Any) -> int:
        head = self._head(event_name, content)
        args = ("EVALSHA", self.sha, 1, "replay:" + channel, "mq:" + channel, head, b"}")
        try:
            return self.db.execute_command(*args)
        except NoScriptError:
            self.sha = self.db.script_load(self.script)
            return self.db.execute_command(*args)

    def broadcast_many(self, items: list[tuple[str, str, Any]]) -> list[int]:
        # Serialize everything first: one bad item raises before anything is sent.
        commands = [
            ("replay:" + channel, "mq:" + channel, self._head(event_name, content))
            for channel, event_name, content in items
        ]
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        for attempt in range(2):
            pipe = self.db.pipeline(transaction=False)
            for index in pending:
                log_key, channel_key, head = commands[index]
                pipe.execute_command("EVALSHA", self.sha, 1, log_key, channel_key, head, b"}")
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
            self.sha = self.db.script_load(self.script)
            pending = retry
        return results

    def unspool(self, channel: str, since: int) -> list[Any]:
        messages = self.db.execute_command("ZRANGEBYSCORE", "replay:" + channel, f"({since}", "+inf")
        loads = orjson.loads
        return [loads(message) for message in messages]

    def unspool_raw(self, channel: str, since: int) -> list[str]:
        messages = self.db.execute_command("ZRANGEBYSCORE", "replay:" + channel, f"({since}", "+inf")
        return [message.decode() for message in messages]

    def prune(self) -> int:
        seconds, micros = self.db.time()
        oldest_kept = seconds * 1000 + micros // 1000 - self.expire_ms
        removed = 0
        cursor = 0
        while True:
            cursor, keys = self.db.scan(
                cursor, match="replay:*", count=self.scan_count, _type="zset"
            )
            if keys:
                pipe = self.db.pipeline(transaction=False)
                for key in keys:
                    pipe.zremrangebyscore(key, "-inf", oldest_kept)
                removed += sum(pipe.execute())
            if cursor == 0:
                return removed

    def close(self) -> None:
        self.db.close()
        self.db.connection_pool.disconnect()


class Native:
    """replaylog itself, through its public Python API."""

    name = "replaylog"
    has_broadcast_many = True
    broadcast_many_note = ""

    def __init__(self, url: str, expire_ms: int) -> None:
        self.log = replaylog.ReplayLog(url, expire_ms=expire_ms)
        self.broadcast: Callable[[str, str, Any], int] = self.log.broadcast
        self.broadcast_many: Optional[Callable[[list[tuple[str, str, Any]]], list[int]]] = (
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


IMPLEMENTATIONS = (Article, Peer, Native)
