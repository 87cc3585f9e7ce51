"""Subscriptions of one log in one process share one pub/sub connection (issue 17), and each
still gets its own gapless, in-order stream from its own cursor."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

import replaylog


def pubsub_connections(rdb: redis.Redis) -> int:
    return len(rdb.client_list(_type="pubsub"))


def listeners(rdb: redis.Redis, channel: str) -> int:
    [(_, count)] = rdb.pubsub_numsub(f"mq:{channel}")
    return int(count)


def take(sub: replaylog.Subscription, count: int) -> list[dict[str, Any]]:
    got = []
    for _ in range(count):
        message = sub.get(timeout=10)
        assert message is not None, f"only {len(got)} of {count} arrived"
        got.append(message)
    return got


def wait_until(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


def test_many_subscriptions_hold_one_connection(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    subs = [replay_log.subscribe([f"room:{i % 7}", "lobby"]) for i in range(200)]
    try:
        assert pubsub_connections(rdb) == 1
        assert listeners(rdb, "lobby") == 1 and listeners(rdb, "room:3") == 1
        stamp = replay_log.broadcast("lobby", "e", "to all")
        for sub in subs:
            assert sub.get(timeout=10)["timestamp"] == stamp
    finally:
        for sub in subs:
            sub.close()
    wait_until(lambda: pubsub_connections(rdb) == 0, "the connection closed with the last")


def test_two_subscribers_with_different_cursors_each_get_exactly_their_stream(
    replay_log: replaylog.ReplayLog,
) -> None:
    stamps = [replay_log.broadcast("room", "e", i) for i in range(10)]
    with (
        replay_log.subscribe("room", since=stamps[2]) as early,
        replay_log.subscribe("room", since=stamps[7]) as late,
    ):
        live = [replay_log.broadcast("room", "e", i) for i in range(10, 15)]
        assert [m["timestamp"] for m in take(early, 12)] == stamps[3:] + live
        assert [m["timestamp"] for m in take(late, 7)] == stamps[8:] + live
        assert early.get(timeout=0.2) is None and late.get(timeout=0.2) is None


def test_a_stalled_subscriber_does_not_delay_a_fast_one(replaylog_url: str) -> None:
    log = replaylog.ReplayLog(replaylog_url, subscription_buffer_bytes=20_000)
    try:
        with log.subscribe("room") as stalled, log.subscribe("room") as fast:
            stamps = []
            for i in range(300):
                stamps.append(log.broadcast("room", "e", {"i": i, "pad": "x" * 1_000}))
                # The fast one has each message before the next is sent, while the stalled
                # one reads nothing: 300 kB for it, 15 times its bound.
                assert fast.get(timeout=10)["timestamp"] == stamps[-1]
            assert stalled.queued_bytes <= 20_000
            # The stalled one loses nothing: what did not fit comes from the log.
            assert [m["timestamp"] for m in take(stalled, 300)] == stamps
            assert stalled.get(timeout=0.2) is None
    finally:
        log.close()


def test_the_last_subscriber_leaving_unsubscribes_the_channel(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    first = replay_log.subscribe("x")
    second = replay_log.subscribe(["x", "y"])
    assert (listeners(rdb, "x"), listeners(rdb, "y")) == (1, 1)
    first.close()
    assert (listeners(rdb, "x"), listeners(rdb, "y")) == (1, 1)
    third = replay_log.subscribe("y")
    second.close()
    assert (listeners(rdb, "x"), listeners(rdb, "y")) == (0, 1)
    assert pubsub_connections(rdb) == 1
    # The one left still hears its channel, and only it.
    stamp = replay_log.broadcast("y", "e", "still here")
    assert third.get(timeout=10)["timestamp"] == stamp
    third.close()
    wait_until(lambda: pubsub_connections(rdb) == 0, "no pub/sub connection left")
    # A subscription made afterwards connects again.
    with replay_log.subscribe("x") as again:
        stamp = replay_log.broadcast("x", "e", "back")
        assert again.get(timeout=10)["timestamp"] == stamp


def test_killing_the_shared_connection_leaves_every_subscriber_gapless(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    channels = ["a", "b"]
    total = 400
    stamps: dict[str, list[int]] = {channel: [] for channel in channels}
    done = threading.Event()

    def publish() -> None:
        for i in range(total):
            for channel in channels:
                stamps[channel].append(replay_log.broadcast(channel, "e", i))
            time.sleep(0.001)
        done.set()

    subs = {
        "both": replay_log.subscribe(channels),
        "a": replay_log.subscribe("a"),
        "b, from 0": replay_log.subscribe("b", since=0),
    }
    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        kills = 0
        while not done.is_set():
            time.sleep(0.05)
            kills += rdb.client_kill_filter(_type="pubsub")
        publisher.join()
        assert kills >= 3
        got = {name: take(sub, total * (2 if name == "both" else 1)) for name, sub in subs.items()}
    finally:
        for sub in subs.values():
            sub.close()
    for name, messages in got.items():
        for channel in channels:
            if name in ("both", channel) or name.startswith(channel):
                mine = [m["timestamp"] for m in messages if m["channel"] == channel]
                assert mine == stamps[channel], (name, channel)
