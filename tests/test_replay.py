"""``replay()``: complete-or-say-so, and bounded logs (max_len, key expiry, prune by age).

Issue 4's "done means": ``.complete`` is True on an intact log (``since=0`` included), and False
after a prune past the cursor, a trim by ``max_len``, an expired key and ``FLUSHALL``; the
bookkeeping of an idle channel expires, as ``TTL`` shows; bookkeeping it cannot read costs
completeness, never the channel.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
from conftest import article_broadcast, contents, receive, redis_now_ms

import replaylog

# --------------------------------------------------------------------------- helpers


def wait_until_gone(client: redis.Redis, *keys: str, timeout: float = 5.0) -> None:
    """Polls EXISTS (which also expires lazily) until none of ``keys`` exists."""
    deadline = time.monotonic() + timeout
    while client.exists(*keys):
        if time.monotonic() > deadline:
            raise AssertionError(f"{keys} still exist after {timeout}s")
        time.sleep(0.01)


def timestamps(messages: list[dict[str, Any]]) -> list[int]:
    return [m["timestamp"] for m in messages]


def log_with_old_and_new(
    log: replaylog.ReplayLog, channel: str, old: int = 3, new: int = 1
) -> tuple[list[int], list[int]]:
    """``old`` messages, a 300 ms pause, then ``new`` messages; a prune with expire_ms=150
    right after removes exactly the old ones (their age is >= 300 ms, the new ones' ~0)."""
    old_ts = [log.broadcast(channel, "old", i) for i in range(old)]
    time.sleep(0.3)
    new_ts = [log.broadcast(channel, "new", i) for i in range(new)]
    return old_ts, new_ts


# --------------------------------------------------------------------------- intact logs


def test_intact_log_is_complete_from_every_cursor(replay_log: replaylog.ReplayLog) -> None:
    stamps = [replay_log.broadcast("intact", "e", {"i": i}) for i in range(6)]

    everything = replay_log.replay("intact", 0)
    assert everything.complete is True
    assert timestamps(everything.messages) == stamps
    assert [m["content"] for m in everything.messages] == [{"i": i} for i in range(6)]
    assert isinstance(everything.epoch, str) and everything.epoch

    for i, since in enumerate(stamps):
        r = replay_log.replay("intact", since)
        assert r.complete is True, f"cursor {i} ({since})"
        assert timestamps(r.messages) == stamps[i + 1 :]
        assert r.epoch == everything.epoch
        # Cursors arrive as text and floats too.
        assert replay_log.replay("intact", str(since)) == r
        assert replay_log.replay("intact", float(since)) == r
        # The epoch the client kept is the log's own: still complete.
        assert replay_log.replay("intact", since, epoch=everything.epoch).complete is True


def test_replay_messages_equal_unspool_and_unspool_stays_a_plain_list(
    replay_log: replaylog.ReplayLog,
) -> None:
    stamps = [replay_log.broadcast("plain", "e", [i, "x"]) for i in range(4)]
    for since in (0, stamps[0], stamps[2], stamps[-1]):
        listed = replay_log.unspool("plain", since)
        assert type(listed) is list
        assert all(type(m) is dict for m in listed)
        # The first message of a history has nothing before it; the others link to it.
        for message in listed:
            expected = {"event_name", "content", "timestamp"}
            if message["timestamp"] != stamps[0]:
                expected.add("prev")
            assert set(message) == expected
        assert replay_log.replay("plain", since).messages == listed
    raw = replay_log.replay("plain", 0, raw=True)
    assert [json.loads(m) for m in raw.messages] == replay_log.unspool("plain", 0)
    limited = replay_log.replay("plain", 0, limit=2)
    assert timestamps(limited.messages) == stamps[:2]
    assert [m.get("prev") for m in replay_log.unspool("plain", 0)] == [None, *stamps[:-1]]


def test_module_level_replay_uses_the_default_log(replay_log: replaylog.ReplayLog) -> None:
    ts = replaylog.broadcast("module", "e", 1)
    r = replaylog.replay("module", 0)
    assert isinstance(r, replaylog.Replay)
    assert r.complete is True
    assert timestamps(r.messages) == [ts]
    assert r == replay_log.replay("module", 0)


def test_a_channel_that_never_existed_is_complete_only_from_zero(
    replay_log: replaylog.ReplayLog,
) -> None:
    r = replay_log.replay("nothing-here", 0)
    assert r.complete is True
    assert r.messages == []
    assert replay_log.replay("nothing-here", 12345).complete is False


# --------------------------------------------------------------------------- prune


def test_prune_past_the_cursor_is_incomplete(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    old, new = log_with_old_and_new(replay_log, "pruned", old=3, new=2)
    assert replay_log.replay("pruned", old[0]).complete is True

    removed = replay_log.prune_replay_logs(expire_ms=150)
    assert removed == 3
    assert [int(s) for _, s in rdb.zrange("replay:pruned", 0, -1, withscores=True)] == new

    # Cursors before the newest removed entry: something after them is gone.
    for since in (0, old[0], old[1], old[0] + 1):
        r = replay_log.replay("pruned", since)
        assert r.complete is False, since
        assert timestamps(r.messages) == new
    # At or after the newest removed entry: nothing after the cursor was lost.
    for since in (old[2], old[2] + 1, new[0], new[1]):
        r = replay_log.replay("pruned", since)
        assert r.complete is True, since
        assert timestamps(r.messages) == [t for t in new if t > since]


def test_prune_still_trims_by_age_only(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    _, new_a = log_with_old_and_new(replay_log, "age-a", old=4, new=1)
    new_b = [replay_log.broadcast("age-b", "new", i) for i in range(3)]
    assert replay_log.prune_replay_logs(expire_ms=150) == 4
    assert timestamps(replay_log.unspool("age-a", 0)) == new_a
    assert timestamps(replay_log.unspool("age-b", 0)) == new_b
    # Nothing old is left: a second prune removes nothing, and nothing younger than the
    # expiry is ever touched.
    assert replay_log.prune_replay_logs(expire_ms=60_000) == 0
    assert rdb.zcard("replay:age-a") == 1
    assert rdb.zcard("replay:age-b") == 3
    assert replay_log.replay("age-b", 0).complete is True


def test_async_prune_marks_the_loss_too(replay_log: replaylog.ReplayLog) -> None:
    import asyncio

    old, new = log_with_old_and_new(replay_log, "aprune", old=2, new=1)
    assert asyncio.run(replay_log.aprune_replay_logs(expire_ms=150)) == 2
    assert replay_log.replay("aprune", old[0]).complete is False
    assert replay_log.replay("aprune", old[1]).complete is True


# --------------------------------------------------------------------------- max_len


def test_max_len_caps_the_log_and_a_trim_past_the_cursor_is_incomplete(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=5)
    stamps = [log.broadcast("capped", "e", i) for i in range(8)]
    assert rdb.zcard("replay:capped") == 5
    kept = stamps[3:]
    assert timestamps(log.unspool("capped", 0)) == kept

    for since in (0, stamps[0], stamps[1], stamps[2] - 1):
        r = log.replay("capped", since)
        assert r.complete is False, since
        assert timestamps(r.messages) == kept
    for i in range(2, 8):
        r = log.replay("capped", stamps[i])
        assert r.complete is True, i
        assert timestamps(r.messages) == stamps[i + 1 :]

    # The cap holds for every later broadcast, in the same atomic step.
    for i in range(20):
        log.broadcast("capped", "e", i)
        assert rdb.zcard("replay:capped") == 5
    # The bookkeeping stays small however many messages went through.
    size = rdb.memory_usage("replaymeta:capped")
    assert size is not None and size < 512


def test_max_len_that_never_trims_stays_complete_from_zero(
    replaylog_url: str, replay_log: replaylog.ReplayLog
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=5)
    stamps = [log.broadcast("fits", "e", i) for i in range(5)]
    r = log.replay("fits", 0)
    assert r.complete is True
    assert timestamps(r.messages) == stamps


# --------------------------------------------------------------------------- expiry


def test_key_ttls_after_broadcast(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, expire_ms=60_000)
    log.broadcast("ttl", "e", 1)
    assert 58_000 < rdb.pttl("replay:ttl") <= 60_000
    assert 118_000 < rdb.pttl("replaymeta:ttl") <= 120_000
    # Every broadcast pushes the expiry back.
    time.sleep(0.2)
    log.broadcast("ttl", "e", 2)
    assert 59_700 < rdb.pttl("replay:ttl") <= 60_000
    assert 119_700 < rdb.pttl("replaymeta:ttl") <= 120_000


def test_idle_channel_keys_all_expire(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, expire_ms=300, idempotency_window_ms=400)
    log.broadcast("idle", "e", 1)
    log.broadcast("idle", "e", 2, idempotency_key="retry-1")
    once = f"replayonce:{len('idle')}:idle:retry-1"
    keys = ("replay:idle", "replaymeta:idle", once)
    assert rdb.exists(*keys) == 3
    assert 0 < rdb.pttl("replay:idle") <= 300
    assert 300 < rdb.pttl("replaymeta:idle") <= 600
    assert 0 < rdb.pttl(once) <= 400
    for key in keys:
        assert rdb.ttl(key) >= 0, key  # -1 would mean "never expires"
    wait_until_gone(rdb, *keys, timeout=5)
    assert rdb.keys("*") == []


def test_expired_log_is_incomplete_except_from_its_newest_message(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, expire_ms=500)
    stamps = [log.broadcast("expiring", "e", i) for i in range(3)]
    wait_until_gone(rdb, "replay:expiring")
    # The bookkeeping outlives the log (2 x expire_ms): the loss can still be told.
    assert rdb.exists("replaymeta:expiring") == 1

    for since in (0, stamps[0], stamps[1]):
        r = log.replay("expiring", since)
        assert r.complete is False, since
        assert r.messages == []
    r = log.replay("expiring", stamps[2])
    assert r.complete is True
    assert r.messages == []

    # A new message after the expiry: complete from the old newest message, not before it.
    ts = log.broadcast("expiring", "e", 3)
    assert ts > stamps[2]
    r = log.replay("expiring", stamps[2])
    assert r.complete is True
    assert timestamps(r.messages) == [ts]
    assert log.replay("expiring", stamps[1]).complete is False
    assert log.replay("expiring", 0).complete is False


# --------------------------------------------------------------------------- FLUSHALL


def test_flushall_makes_replays_incomplete(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stamps = [replay_log.broadcast("flushed", "e", i) for i in range(3)]
    old_epoch = replay_log.replay("flushed", 0).epoch
    rdb.flushall()

    for since in (stamps[0], stamps[1], stamps[2]):
        r = replay_log.replay("flushed", since)
        assert r.complete is False, since
        assert r.messages == []
        r = replay_log.replay("flushed", since, epoch=old_epoch)
        assert r.complete is False, since


def test_flushall_then_new_broadcasts_with_the_old_epoch_is_incomplete(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    before = [replay_log.broadcast("reborn", "e", i) for i in range(3)]
    old_epoch = replay_log.replay("reborn", before[1]).epoch
    rdb.flushall()
    time.sleep(0.005)
    after = [replay_log.broadcast("reborn", "e", i) for i in range(2)]

    new = replay_log.replay("reborn", 0)
    assert new.epoch != old_epoch
    assert timestamps(new.messages) == after
    # The client that kept its cursor and epoch learns that its history is gone.
    for since in (0, before[1], before[2]):
        r = replay_log.replay("reborn", since, epoch=old_epoch)
        assert r.complete is False, since
        assert timestamps(r.messages) == [t for t in after if t > since]
    # Without an epoch a cursor from the lost history is still caught.
    assert replay_log.replay("reborn", before[2]).complete is False
    # With the new epoch, the new history is complete.
    assert replay_log.replay("reborn", 0, epoch=new.epoch).complete is True
    assert replay_log.replay("reborn", after[0], epoch=new.epoch).complete is True


def test_cursor_from_the_future_is_incomplete(replay_log: replaylog.ReplayLog) -> None:
    ts = replay_log.broadcast("future", "e", 1)
    assert replay_log.replay("future", ts).complete is True
    assert replay_log.replay("future", ts + 60_000).complete is False


def test_replay_rejects_a_non_string_epoch(replay_log: replaylog.ReplayLog) -> None:
    replay_log.broadcast("epoch-type", "e", 1)
    with pytest.raises(TypeError):
        replay_log.replay("epoch-type", 0, epoch=5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- epochs


def redis_now_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1_000_000 + micros


def test_a_history_s_epoch_is_the_redis_time_in_microseconds_when_it_began(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    before = redis_now_us(rdb)
    first = replay_log.broadcast("epoch-time", "e", 1)
    after = redis_now_us(rdb)
    epoch = replay_log.replay("epoch-time", 0).epoch
    assert isinstance(epoch, str)
    assert before <= int(epoch) <= after
    # Later broadcasts go on with the same history.
    replay_log.broadcast("epoch-time", "e", 2)
    assert replay_log.replay("epoch-time", first).epoch == epoch


def test_bookkeeping_from_before_epochs_reads_with_its_base_as_the_epoch(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    first = replay_log.broadcast("old-meta", "e", 1)
    base, top, fresh = rdb.get("replaymeta:old-meta").decode().split(" ")[:3]
    rdb.set("replaymeta:old-meta", f"{base} {top} {fresh}")  # "base top fresh": no epoch, no writer
    r = replay_log.replay("old-meta", 0)
    assert (r.epoch, r.complete) == (base, True)
    # Broadcasts after the upgrade go on with that history: its clients stay complete.
    second = replay_log.broadcast("old-meta", "e", 2)
    r = replay_log.replay("old-meta", first, epoch=base)
    assert (r.epoch, r.complete) == (base, True)
    assert timestamps(r.messages) == [second]


# --------------------------------------------------------------------------- legacy logs


def test_legacy_log_is_incomplete_but_unspool_still_reads_it(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stamps = []
    for i in range(3):
        stamps.append(article_broadcast(rdb, "legacy", "old", {"i": i}))
        time.sleep(0.002)
    assert rdb.exists("replaymeta:legacy") == 0

    assert [m["content"] for m in replay_log.unspool("legacy", 0)] == [{"i": i} for i in range(3)]
    assert timestamps(replay_log.unspool("legacy", stamps[0])) == stamps[1:]
    for since in (stamps[0], stamps[1]):
        r = replay_log.replay("legacy", since)
        assert r.complete is False, since
        assert timestamps(r.messages) == [t for t in stamps if t > since]
        assert r.epoch is None  # no bookkeeping: no history to name

    # Once replaylog writes to it, the log vouches for what follows its newest entry.
    ts = replay_log.broadcast("legacy", "new", {"i": 3})
    assert ts > stamps[-1]
    r = replay_log.replay("legacy", stamps[-1])
    assert r.complete is True
    assert timestamps(r.messages) == [ts]
    assert replay_log.replay("legacy", stamps[0]).complete is False


def test_a_trim_past_the_cursor_after_a_legacy_entry_is_incomplete(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=2)
    t1 = log.broadcast("c", "e", 1)
    t2 = log.broadcast("c", "e", 2)
    # The article's code, in a rolling deploy, writes one entry with its own (app) clock.
    legacy_ts = t2 + 5
    legacy = json.dumps({"event_name": "e", "content": "legacy", "timestamp": legacy_ts})
    rdb.zadd("replay:c", {legacy: legacy_ts})
    while redis_now_ms(rdb) <= legacy_ts + 1:
        time.sleep(0.005)
    t3 = log.broadcast("c", "e", 3)  # max_len=2 trims t1 and t2
    assert t3 > legacy_ts
    assert [int(s) for _, s in rdb.zrange("replay:c", 0, -1, withscores=True)] == [legacy_ts, t3]

    result = log.replay("c", since=t1)  # t2 came after the cursor, and it is gone
    assert result.complete is False
    assert contents(result.messages) == ["legacy", 3]
    # From the legacy entry on, the chain is intact.
    assert log.replay("c", since=legacy_ts).complete is True
    # And a subscription from t1 reports the hole.
    with log.subscribe("c", since=t1) as sub:
        with pytest.raises(replaylog.IncompleteReplayError):
            sub.get(timeout=5)


# --------------------------------------------------------------------------- malformed bookkeeping


def test_malformed_bookkeeping_is_incomplete_until_broadcasts_vouch_again(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    rdb.set("replaymeta:bad", "garbage")
    before = replay_log.replay("bad", since=5)
    assert before.complete is False
    assert before.messages == []

    t1 = replay_log.broadcast("bad", "e", 1)
    assert replay_log.replay("bad", since=t1 - 1).complete is False  # nothing vouches for it
    t2 = replay_log.broadcast("bad", "e", 2)
    assert t2 > t1
    after = replay_log.replay("bad", since=t1)
    assert after.complete is True
    assert contents(after.messages) == [2]
    with replay_log.subscribe("bad", since=t2) as sub:
        t3 = replay_log.broadcast("bad", "e", 3)
        [message] = receive(sub, 1, timeout=10)
    assert message["timestamp"] == t3
