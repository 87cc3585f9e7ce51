"""A call after a quiet spell (a Django view's broadcast, every so often) costs one round trip:
no PING first. A connection that Redis closed is noticed from its socket instead, so the call
after a restart or a CLIENT KILL still succeeds (issue 15)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from conftest import OUTAGE, RedisServer, contents

import replaylog

QUIET = 0.15  # longer than the 100 ms after which a connection is checked before use


def commands(client: redis.Redis, name: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_sporadic_calls_send_no_ping(replaylog_url: str, rdb: redis.Redis) -> None:
    log = replaylog.ReplayLog(replaylog_url)
    try:
        log.broadcast("sporadic", "e", "connect")
        log.replay("sporadic", 0)  # both scripts loaded: no NOSCRIPT retry counted below
        rdb.config_resetstat()
        for i in range(8):
            time.sleep(QUIET)
            log.broadcast("sporadic", "e", i)
            time.sleep(QUIET)
            log.replay("sporadic", 0)
        assert commands(rdb, "ping") == 0
        assert commands(rdb, "evalsha") == 16
    finally:
        log.close()


def kill_other_clients(client: redis.Redis) -> int:
    me = client.client_id()
    others = [c["id"] for c in client.client_list() if int(c["id"]) != me]
    for other in others:
        client.client_kill_filter(_id=other)
    return len(others)


def test_the_call_after_client_kill_succeeds(dedicated_redis: Any) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    control = dedicated_redis.client()
    try:
        stamps = []
        for i in range(10):
            stamps.append(log.broadcast("killed", "e", i))
            assert kill_other_clients(control) == 1
            time.sleep(QUIET)
            stamps.append(log.broadcast("killed", "e", i))  # raises if sent on the dead one
        assert [m["timestamp"] for m in log.unspool("killed", 0)] == stamps
    finally:
        control.close()
        log.close()


def test_the_call_after_a_redis_restart_succeeds(dedicated_redis: Any) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    try:
        for i in range(3):
            log.broadcast("restarted", "e", i)
            dedicated_redis.restart()
            time.sleep(QUIET)
            stamp = log.broadcast("restarted", "e", i)
            assert [m["timestamp"] for m in log.unspool("restarted", 0)] == [stamp]
    finally:
        log.close()


@pytest.mark.parametrize("outage", [0.0, OUTAGE], ids=["quick", "down-1s"])
@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_the_first_call_after_a_restart_succeeds_sync_or_async_whatever_the_outage(
    dedicated_redis: RedisServer, flavor: str, outage: float
) -> None:
    """README: "After a Redis restart the same objects work again". Redis is back (it answers
    PING) before the call, so nothing should fail."""
    log = replaylog.ReplayLog(dedicated_redis.url)

    def call(content: int) -> int:
        if flavor == "sync":
            return log.broadcast("r", "e", content)
        return asyncio.run(log.abroadcast("r", "e", content))

    call(0)
    dedicated_redis.stop()
    time.sleep(outage)
    dedicated_redis.start()
    time.sleep(0.3)
    outcomes = []
    for content in (1, 2):
        try:
            call(content)
            outcomes.append("ok")
        except replaylog.ConnectionError as error:
            outcomes.append(f"{type(error).__name__}: {error}")
    assert outcomes == ["ok", "ok"]
    assert contents(log.unspool("r")) == [1, 2]
