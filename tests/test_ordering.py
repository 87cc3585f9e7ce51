"""Timestamps: from the Redis clock, strictly increasing per channel; unspool from any cursor."""

from __future__ import annotations

import json

import redis
from conftest import redis_now_ms, stored_members

import replaylog


def test_3000_identical_broadcasts_are_all_kept(rdb: redis.Redis) -> None:
    stamps = [replaylog.broadcast("same", "tick", {"same": True}) for _ in range(3000)]

    assert all(isinstance(t, int) for t in stamps)
    assert all(a < b for a, b in zip(stamps, stamps[1:])), "timestamps not strictly increasing"
    assert rdb.zcard("replay:same") == 3000
    stored = stored_members(rdb, "replay:same")
    assert [s for _, s in stored] == stamps
    assert len({m for m, _ in stored}) == 3000
    got = replaylog.unspool("same", 0)
    assert len(got) == 3000
    assert [m["timestamp"] for m in got] == stamps
    assert all(m["content"] == {"same": True} and m["event_name"] == "tick" for m in got)


def test_unspool_from_every_cursor(rdb: redis.Redis) -> None:
    contents = [i % 3 for i in range(150)]  # many identical messages, back to back
    stamps = [replaylog.broadcast("cursor", "e", c) for c in contents]
    expected = list(zip(stamps, contents))

    def pairs(msgs: list) -> list:
        return [(m["timestamp"], m["content"]) for m in msgs]

    assert pairs(replaylog.unspool("cursor", 0)) == expected
    assert pairs(replaylog.unspool("cursor", stamps[0] - 1)) == expected
    assert replaylog.unspool("cursor", stamps[-1]) == []
    for i, ts in enumerate(stamps):
        after = expected[i + 1 :]
        assert pairs(replaylog.unspool("cursor", ts)) == after, f"cursor {i}"
        assert pairs(replaylog.unspool("cursor", float(ts))) == after, f"float cursor {i}"
        assert pairs(replaylog.unspool("cursor", str(ts))) == after, f"str cursor {i}"
        # A cursor between two timestamps.
        assert pairs(replaylog.unspool("cursor", ts + 0.5)) == after
        assert pairs(replaylog.unspool("cursor", f"{ts}.5")) == after


def test_unspool_default_since_returns_everything(rdb: redis.Redis) -> None:
    stamps = [replaylog.broadcast("dflt", "e", i) for i in range(4)]
    assert [m["timestamp"] for m in replaylog.unspool("dflt")] == stamps


def test_unspool_limit(rdb: redis.Redis) -> None:
    stamps = [replaylog.broadcast("lim", "e", i) for i in range(20)]
    assert [m["content"] for m in replaylog.unspool("lim", 0, limit=5)] == [0, 1, 2, 3, 4]
    assert [m["content"] for m in replaylog.unspool("lim", 0, limit=1)] == [0]
    assert [m["content"] for m in replaylog.unspool("lim", stamps[9], limit=3)] == [10, 11, 12]
    assert [m["content"] for m in replaylog.unspool("lim", stamps[17], limit=10)] == [18, 19]
    assert [m["content"] for m in replaylog.unspool("lim", 0, limit=100)] == list(range(20))
    assert [m["content"] for m in replaylog.unspool("lim", 0, limit=None)] == list(range(20))
    raw = replaylog.unspool("lim", stamps[4], raw=True, limit=2)
    assert [json.loads(r)["content"] for r in raw] == [5, 6]
    assert raw == [m for m, _ in stored_members(rdb, "replay:lim")][5:7]


def test_unspool_of_an_unknown_channel_is_empty(rdb: redis.Redis) -> None:
    assert replaylog.unspool("never-used", 0) == []
    assert replaylog.unspool("never-used", 0, raw=True) == []
    assert rdb.dbsize() == 0


def test_timestamps_come_from_the_redis_clock(rdb: redis.Redis) -> None:
    before = redis_now_ms(rdb)
    ts = replaylog.broadcast("clock", "e", None)
    after = redis_now_ms(rdb)
    # On a fresh channel nothing needs moving forward: the Redis time at the call.
    assert before - 1 <= ts <= after + 1


def test_channels_do_not_share_entries(rdb: redis.Redis) -> None:
    a = [replaylog.broadcast("chan-a", "e", i) for i in range(3)]
    b = [replaylog.broadcast("chan-b", "e", -i) for i in range(3)]
    assert [m["timestamp"] for m in replaylog.unspool("chan-a", 0)] == a
    assert [m["content"] for m in replaylog.unspool("chan-b", 0)] == [0, -1, -2]
    assert [m["timestamp"] for m in replaylog.unspool("chan-b", 0)] == b


def test_broadcast_many_keeps_call_order(rdb: redis.Redis) -> None:
    items = [("many-a", "e", 1), ("many-b", "e", 2), ("many-a", "e", 1), ("many-a", "f", 3)]
    stamps = replaylog.broadcast_many(items)
    assert len(stamps) == 4
    got_a = replaylog.unspool("many-a", 0)
    assert [(m["event_name"], m["content"]) for m in got_a] == [("e", 1), ("e", 1), ("f", 3)]
    assert [m["timestamp"] for m in got_a] == [stamps[0], stamps[2], stamps[3]]
    assert stamps[0] < stamps[2] < stamps[3]
    assert [m["timestamp"] for m in replaylog.unspool("many-b", 0)] == [stamps[1]]
    assert rdb.zcard("replay:many-a") == 3


def test_unspool_many(rdb: redis.Redis) -> None:
    a = [replaylog.broadcast("um-a", "e", i) for i in range(3)]
    b = [replaylog.broadcast("um-b", "e", i) for i in range(2)]
    got = replaylog.unspool_many({"um-a": a[0], "um-b": 0, "um-c": 0})
    assert set(got) == {"um-a", "um-b", "um-c"}
    assert [m["timestamp"] for m in got["um-a"]] == a[1:]
    assert [m["timestamp"] for m in got["um-b"]] == b
    assert got["um-c"] == []
    raw = replaylog.unspool_many({"um-a": 0}, raw=True, limit=2)
    assert raw == {"um-a": [m for m, _ in stored_members(rdb, "replay:um-a")][:2]}


def test_unspool_limit_larger_than_any_log(rdb: redis.Redis) -> None:
    """A limit is "at most N": a Python int too big for 64 bits still just means everything."""
    stamps = [replaylog.broadcast("biglim", "e", i) for i in range(3)]
    for limit in (2**63 - 1, 2**63, 2**64, 10**30):
        got = replaylog.unspool("biglim", 0, limit=limit)
        assert [m["timestamp"] for m in got] == stamps, limit
