"""Idempotent retries: ``broadcast(..., idempotency_key=...)`` stores and publishes once within
the window and returns the first timestamp; outside the window it is a new message. Distinct
(channel, key) pairs never share a Redis key."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import redis
from conftest import PublishWatcher, contents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replaylog


def idempotency_keys(rdb: redis.Redis) -> list[bytes]:
    """The idempotency keys, without the writing master's marks beside them (`replayonce:w:`)."""
    return rdb.keys("replayonce:[0-9]*")


def published_on(watcher: PublishWatcher, channel: str) -> list[dict]:
    name = f"mq:{channel}".encode()
    return [json.loads(data) for ch, data in watcher.published() if ch == name]


def once_key(channel: str, key: str) -> str:
    return f"replayonce:{len(channel)}:{channel}:{key}"


def test_retry_inside_the_window_is_stored_and_published_once(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    first = replay_log.broadcast("orders", "created", {"id": 1}, idempotency_key="req-1")
    again = replay_log.broadcast("orders", "created", {"id": 1}, idempotency_key="req-1")
    # Even a retry whose content differs (a re-rendered payload) is the same publish.
    third = replay_log.broadcast("orders", "created", {"id": 1, "n": 2}, idempotency_key="req-1")
    assert again == first
    assert third == first

    assert rdb.zcard("replay:orders") == 1
    live = published_on(watcher, "orders")
    assert len(live) == 1
    assert live[0] == {"event_name": "created", "content": {"id": 1}, "timestamp": first}
    assert replay_log.unspool("orders", 0) == live


def test_retry_after_other_messages_still_returns_the_first_timestamp(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    first = replay_log.broadcast("mixed", "e", "a", idempotency_key="k")
    other = replay_log.broadcast("mixed", "e", "b")
    retried = replay_log.broadcast("mixed", "e", "a", idempotency_key="k")
    assert retried == first
    assert other > first
    assert rdb.zcard("replay:mixed") == 2
    assert [m["content"] for m in published_on(watcher, "mixed")] == ["a", "b"]


def test_a_different_key_is_a_new_message(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    a = replay_log.broadcast("keys", "e", 1, idempotency_key="one")
    b = replay_log.broadcast("keys", "e", 1, idempotency_key="two")
    c = replay_log.broadcast("keys", "e", 1)  # no key: never deduplicated
    d = replay_log.broadcast("keys", "e", 1)
    assert a < b < c < d
    assert rdb.zcard("replay:keys") == 4
    assert len(published_on(watcher, "keys")) == 4


def test_same_key_on_two_channels_is_two_messages(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    replay_log.broadcast("chan-a", "e", 1, idempotency_key="shared")
    replay_log.broadcast("chan-b", "e", 1, idempotency_key="shared")
    # Channel and key are kept apart even when their text could run together.
    replay_log.broadcast("x:y", "e", 1, idempotency_key="z")
    replay_log.broadcast("x", "e", 1, idempotency_key="y:z")
    for channel in ("chan-a", "chan-b", "x:y", "x"):
        assert rdb.zcard(f"replay:{channel}") == 1, channel
    published = watcher.published()
    assert sorted(ch for ch, _ in published) == sorted(
        [b"mq:chan-a", b"mq:chan-b", b"mq:x:y", b"mq:x"]
    )


def test_after_the_window_it_is_a_new_message(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    log = replaylog.ReplayLog(replaylog_url, idempotency_window_ms=200)
    first = log.broadcast("window", "e", 1, idempotency_key="late")
    assert log.broadcast("window", "e", 1, idempotency_key="late") == first
    pttl = rdb.pttl(once_key("window", "late"))
    assert 0 < pttl <= 200
    time.sleep(0.25)
    assert rdb.exists(once_key("window", "late")) == 0
    second = log.broadcast("window", "e", 1, idempotency_key="late")
    assert second > first
    assert rdb.zcard("replay:window") == 2
    assert [m["timestamp"] for m in published_on(watcher, "window")] == [first, second]
    # And the new publish opens a new window.
    assert log.broadcast("window", "e", 1, idempotency_key="late") == second


def test_default_window_is_a_few_minutes(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    replay_log.broadcast("default-window", "e", 1, idempotency_key="k")
    ttl = rdb.pttl(once_key("default-window", "k"))
    assert 60_000 <= ttl <= 30 * 60_000


def test_concurrent_retries_publish_once(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    results: list[int] = []
    barrier = threading.Barrier(16)

    def retry() -> None:
        barrier.wait()
        results.append(replay_log.broadcast("race", "e", {"x": 1}, idempotency_key="same"))

    threads = [threading.Thread(target=retry) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 16
    assert len(set(results)) == 1
    assert rdb.zcard("replay:race") == 1
    assert len(published_on(watcher, "race")) == 1


def test_module_level_and_async_retries_are_idempotent_too(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    first = replaylog.broadcast("aio-retry", "e", 1, idempotency_key="k")

    async def main() -> list[int]:
        return list(
            await asyncio.gather(
                *(replaylog.abroadcast("aio-retry", "e", 1, idempotency_key="k") for _ in range(5))
            )
        )

    assert asyncio.run(main()) == [first] * 5
    assert asyncio.run(replay_log.abroadcast("aio-retry", "e", 1, idempotency_key="k")) == first
    assert rdb.zcard("replay:aio-retry") == 1
    assert len(published_on(watcher, "aio-retry")) == 1


def old_layout_twins(channel: str, key: str) -> list[tuple[str, str]]:
    """Other (channel, key) pairs the old layout, ``<channel>:<len>:<key>``, mapped to the
    same Redis key as this one."""
    name = f"{channel}:{len(channel)}:{key}"
    twins = []
    for cut in range(len(name) + 1):
        marker = f":{cut}:"
        if name[cut:].startswith(marker):
            twin = (name[:cut], name[cut + len(marker) :])
            if twin != (channel, key):
                twins.append(twin)
    return twins


def test_pairs_the_old_key_layout_confused_are_two_messages(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    assert ("a:1:", "z") in old_layout_twins("a", ":4:z")
    first = replay_log.broadcast("a", "e", 1, idempotency_key=":4:z")
    second = replay_log.broadcast("a:1:", "e", 2, idempotency_key="z")
    # Two messages (timestamps are per channel, so they may be equal).
    assert contents(replay_log.unspool("a")) == [1]
    assert contents(replay_log.unspool("a:1:")) == [2]
    assert replay_log.unspool("a:1:")[0]["timestamp"] == second
    assert len(idempotency_keys(rdb)) == 2
    # A retry of either is still recognised.
    assert replay_log.broadcast("a", "e", 1, idempotency_key=":4:z") == first
    assert replay_log.broadcast("a:1:", "e", 2, idempotency_key="z") == second


def test_pairs_the_old_key_layout_confused_are_two_messages_with_cluster_keys(
    replay_log: replaylog.ReplayLog, replaylog_url: str, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, cluster_keys=True)
    log.broadcast("a", "e", 1, idempotency_key=":4:z")
    log.broadcast("a:1:", "e", 2, idempotency_key="z")
    assert contents(log.unspool("a")) == [1]
    assert contents(log.unspool("a:1:")) == [2]
    assert len(idempotency_keys(rdb)) == 2


names = st.text(alphabet="a:1{}4", min_size=1, max_size=6)


@st.composite
def pairs_with_twins(draw: Any) -> list[tuple[str, str]]:
    pairs = draw(st.lists(st.tuples(names, names), min_size=1, max_size=6))
    for channel, key in list(pairs):
        pairs.extend(old_layout_twins(channel, key))
    return list(dict.fromkeys(pairs))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pairs=pairs_with_twins())
def test_distinct_channel_key_pairs_get_distinct_idempotency_keys(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, pairs: list[tuple[str, str]]
) -> None:
    rdb.flushall()
    for index, (channel, key) in enumerate(pairs):
        replay_log.broadcast(channel, "e", index, idempotency_key=key)
    assert len(idempotency_keys(rdb)) == len(pairs)
    stored = sorted(
        m["content"] for channel in {c for c, _ in pairs} for m in replay_log.unspool(channel)
    )
    assert stored == list(range(len(pairs)))
