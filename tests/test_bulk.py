"""Unspool's bulk connection: a RESP2 connection of its own that reads replies in one buffer.

It must give exactly what the regular connection gives, authenticate as the URL says, fall back
to the regular connection on anything unusual (so errors read the same), and survive restarts,
threads and forks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisServer

import replaylog


def bulk_clients(client: redis.Redis) -> list[dict[str, Any]]:
    """The connections of ours that speak RESP2: the bulk ones (the regular ones use RESP3)."""
    return [c for c in client.client_list() if c.get("resp") == "2" and c["cmd"] != "client|list"]


def acl_user(admin: redis.Redis, name: str, *commands: str) -> None:
    """An ACL user ``name`` with password ``<name>-pw``, every key and channel, and ``commands``."""
    admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{name}-pw"],
        keys=["*"],
        channels=["*"],
        commands=list(commands),
    )


def stored(client: redis.Redis, key: str) -> list[str]:
    return [member.decode() for member in client.zrange(key, 0, -1)]


def test_unspool_reads_on_a_bulk_connection_and_matches_the_log(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stamps = replay_log.broadcast_many([("a", "e", {"n": n}) for n in range(500)])
    replay_log.broadcast_many([("b", "e", n) for n in range(3)])
    assert replay_log.unspool("a", 0, raw=True) == stored(rdb, "replay:a")
    assert replay_log.unspool("a", stamps[249]) == [
        json.loads(m) for m in stored(rdb, "replay:a")[250:]
    ]
    assert replay_log.unspool_many({"a": stamps[-2], "b": 0, "none": 0}, raw=True) == {
        "a": stored(rdb, "replay:a")[-1:],
        "b": stored(rdb, "replay:b"),
        "none": [],
    }
    assert replay_log.unspool("a", 0, limit=2, raw=True) == stored(rdb, "replay:a")[:2]
    [bulk] = bulk_clients(rdb)
    assert bulk["cmd"] == "zrangebyscore"


def test_large_and_unicode_messages_span_many_reads(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    contents = ["x" * 2_000_000, 'é€😀\n"\\' * 50_000, "", {"nested": ["ü"] * 1000}]
    replay_log.broadcast_many([("big", "e", content) for content in contents])
    raw = replay_log.unspool("big", 0, raw=True)
    assert raw == stored(rdb, "replay:big")
    assert [m["content"] for m in replay_log.unspool("big", 0)] == contents


def test_the_bulk_connection_logs_in_as_the_url_says(redis_server_factory: Any) -> None:
    server = redis_server_factory("--requirepass", "admin-pw", password="admin-pw")
    with server.client() as admin:
        acl_user(admin, "alice", "+@all")
        log = replaylog.ReplayLog(f"redis://alice:alice-pw@127.0.0.1:{server.port}/3")
        ts = log.broadcast("ch", "e", "hello")
        assert [m["timestamp"] for m in log.unspool("ch", 0)] == [ts]
        [bulk] = bulk_clients(admin)
        assert (bulk["user"], bulk["db"]) == ("alice", "3")
        with server.client(db=3) as db3:
            assert log.unspool("ch", 0, raw=True) == stored(db3, "replay:ch")


def test_error_replies_read_as_on_the_regular_connection(redis_server_factory: Any) -> None:
    server = redis_server_factory("--requirepass", "admin-pw", password="admin-pw")
    with server.client() as admin:
        acl_user(admin, "bob", "+@all", "-zrangebyscore")
        bob = replaylog.ReplayLog(f"redis://bob:bob-pw@127.0.0.1:{server.port}/0")
        bob.broadcast("ch", "e", 1)
        connections = 0
        for _ in range(3):
            with pytest.raises(replaylog.PermissionDeniedError) as denied:
                bob.unspool("ch", 0)
            assert denied.value.code == "NOPERM"
            if not connections:
                connections = admin.info("stats")["total_connections_received"]
        # Refused once, the bulk path rests: no connection is opened again on every call.
        assert admin.info("stats")["total_connections_received"] == connections
        assert [c for c in bulk_clients(admin) if c["user"] == "bob"] == []
        admin.set("replay:text", "not a log")
        alice = replaylog.ReplayLog(f"redis://default:admin-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(replaylog.RedisRefusedError) as wrong_type:
            alice.unspool_many({"ch": 0, "text": 0})
        assert wrong_type.value.code == "WRONGTYPE"
        with pytest.raises(replaylog.RedisRefusedError) as wrong_type:
            alice.unspool("text", 0)
        assert wrong_type.value.code == "WRONGTYPE"
        # The log still reads afterwards (on the regular connection while the bulk path rests).
        assert len(alice.unspool("ch", 0)) == 1


def test_a_password_for_a_default_user_without_one_still_reads_in_bulk(
    dedicated_redis: RedisServer,
) -> None:
    # Redis lets any password in for a default user with none (as redis-rs's HELLO does it); a
    # bare AUTH <password> would be refused there.
    url = f"redis://:whatever@127.0.0.1:{dedicated_redis.port}/0"
    log = replaylog.ReplayLog(url)
    ts = log.broadcast("ch", "e", 1)
    assert [m["timestamp"] for m in log.unspool("ch", 0)] == [ts]
    with dedicated_redis.client() as admin:
        [bulk] = bulk_clients(admin)
        assert bulk["cmd"] == "zrangebyscore"


def test_a_unix_socket_url_reads_in_bulk(redis_server_factory: Any, tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = redis_server_factory("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    log = replaylog.ReplayLog(f"unix://{socket_path}?db=0")
    stamps = log.broadcast_many([("ch", "e", n) for n in range(100)])
    assert [m["timestamp"] for m in log.unspool("ch", 0)] == stamps
    with server.client() as admin:
        [bulk] = bulk_clients(admin)
        assert bulk["cmd"] == "zrangebyscore"
        assert log.unspool("ch", 0, raw=True) == stored(admin, "replay:ch")


def test_threads_read_at_once_on_at_most_four_bulk_connections(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, replaylog_url: str
) -> None:
    replay_log.broadcast_many([("shared", "e", {"n": n}) for n in range(300)])
    expected = stored(rdb, "replay:shared")
    # Before redis-py 8 (and so on Python 3.9), rdb's own connection speaks RESP2 too.
    rdb_id = str(rdb.client_id())
    results: list[bool] = []
    most = 0
    reading = True

    def read() -> None:
        for _ in range(30):
            results.append(replay_log.unspool("shared", 0, raw=True) == expected)

    def watch() -> None:
        nonlocal most
        with redis.Redis.from_url(replaylog_url) as watcher:
            while reading:
                bulk = [c for c in bulk_clients(watcher) if c["id"] != rdb_id]
                most = max(most, len(bulk))

    threads = [threading.Thread(target=read) for _ in range(8)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reading = False
    watcher.join()
    assert results == [True] * 240
    # Past four, the threads share the regular connection instead of opening more.
    assert 1 <= most <= 4
    assert 1 <= len(bulk_clients(rdb)) <= 4


def test_a_restart_between_unspools_costs_no_error(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url, connect_timeout=0.5, response_timeout=2)
    log.broadcast("ch", "e", "before")
    assert len(log.unspool("ch", 0)) == 1
    dedicated_redis.restart()  # the idle bulk connection is now dead
    time.sleep(0.2)  # idle long enough that the regular connection is checked (see README)
    assert log.unspool("ch", 0) == []
    ts = log.broadcast("ch", "e", "after")
    assert [m["timestamp"] for m in log.unspool("ch", 0)] == [ts]


def test_a_forked_child_reads_on_its_own_connection(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stamps = replay_log.broadcast_many([("ch", "e", n) for n in range(50)])
    assert len(replay_log.unspool("ch", 0)) == 50  # the parent now has an idle bulk connection
    pid = os.fork()
    if pid == 0:
        ok = [m["timestamp"] for m in replay_log.unspool("ch", 0)] == stamps
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection was left alone by the child.
    assert [m["timestamp"] for m in replay_log.unspool("ch", 0)] == stamps


def test_an_unspool_served_in_bulk_leaves_the_regular_connection_to_its_own_check(
    dedicated_redis: RedisServer,
) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url, connect_timeout=0.5, response_timeout=2)
    log.broadcast("ch", "e", 1)
    time.sleep(0.2)  # quiet: the regular connection's next request is checked first
    with dedicated_redis.client() as admin:
        admin.config_resetstat()
        assert len(log.unspool("ch", 0)) == 1
        # The unspool went out in bulk, with no PING for the regular connection.
        assert "cmdstat_ping" not in admin.info("commandstats")
