"""broadcast_many and unspool_many: order, per-message atomicity, bad items, empty input."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
import redis
from conftest import PublishWatcher, snapshot

import replaylog


def test_ten_thousand_messages_keep_call_order_with_one_timestamp_each(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    items = [(f"bulk-{i % 7}", "e", {"i": i}) for i in range(10_000)]
    stamps = replay_log.broadcast_many(items)
    assert len(stamps) == len(items)
    for channel in {c for c, _, _ in items}:
        sent = [(s, c["i"]) for s, (ch, _, c) in zip(stamps, items) if ch == channel]
        stored = replay_log.unspool(channel, 0)
        assert [(m["timestamp"], m["content"]["i"]) for m in stored] == sent
        timestamps = [m["timestamp"] for m in stored]
        assert timestamps == sorted(set(timestamps))


def test_each_message_is_published_exactly_as_stored(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    stamps = replay_log.broadcast_many([("atom", "e", i) for i in range(500)])
    published = [data for channel, data in watcher.published() if channel == b"mq:atom"]
    stored = rdb.zrange("replay:atom", 0, -1, withscores=True)
    assert published == [member for member, _ in stored]
    assert [int(score) for _, score in stored] == stamps
    assert [json.loads(data)["timestamp"] for data in published] == stamps


def test_concurrent_single_broadcasts_interleave_without_sharing_a_timestamp(
    replay_log: replaylog.ReplayLog,
) -> None:
    """Each message of a batch takes its timestamp in its own atomic step, so broadcasts from
    other threads slot between them and every timestamp stays unique and increasing."""
    singles: list[int] = []

    def single() -> None:
        singles.extend(replay_log.broadcast("mixed", "single", i) for i in range(300))

    thread = threading.Thread(target=single)
    thread.start()
    batches = [
        replay_log.broadcast_many([("mixed", "batch", i) for i in range(100)]) for _ in range(3)
    ]
    thread.join()
    stored = replay_log.unspool("mixed", 0)
    stamps = [m["timestamp"] for m in stored]
    assert len(stored) == 600
    assert stamps == sorted(set(stamps))
    assert sorted(singles + [s for batch in batches for s in batch]) == stamps


def test_one_bad_item_raises_and_writes_or_publishes_nothing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    replay_log.broadcast("keep", "e", 0)
    before = snapshot(rdb)
    watcher.published()
    bad_batches: list[tuple[list[Any], type[Exception], str]] = [
        ([("ok", "e", 1), ("ok", "e", float("nan"))], ValueError, "NaN"),
        ([("ok", "e", 1), ("ok", "e", object())], TypeError, "not JSON serializable"),
        ([("ok", "e", 1), ("ok", 5, 1)], TypeError, "event_name must be str"),
        ([("ok", "e", 1), ("ok", "e")], TypeError, "got 2 items"),
        ([("ok", "e", 1), "not a tuple"], TypeError, "not str"),
    ]
    for batch, error, text in bad_batches:
        with pytest.raises(error, match=f"^broadcast_many item 1: .*{text}"):
            replay_log.broadcast_many(batch)
    assert snapshot(rdb) == before
    assert watcher.published() == []


def test_empty_input_is_a_no_op(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    rdb.config_resetstat()
    assert replay_log.broadcast_many([]) == []
    assert replay_log.unspool_many({}) == {}
    assert asyncio.run(replay_log.abroadcast_many([])) == []
    assert asyncio.run(replay_log.aunspool_many({})) == {}
    commands = rdb.info("commandstats")
    assert not any(name in commands for name in ("cmdstat_evalsha", "cmdstat_zrangebyscore"))
    assert rdb.dbsize() == 0


def test_unspool_many_reads_every_channel_from_its_own_cursor(
    replay_log: replaylog.ReplayLog,
) -> None:
    stamps = {c: replay_log.broadcast_many([(c, "e", i) for i in range(5)]) for c in "abc"}
    cursors = {"a": stamps["a"][1], "b": str(stamps["b"][3]), "c": 0, "never": 0}
    got = replay_log.unspool_many(cursors)
    assert {c: [m["timestamp"] for m in got[c]] for c in got} == {
        "a": stamps["a"][2:],
        "b": stamps["b"][4:],
        "c": stamps["c"],
        "never": [],
    }
    limited = replay_log.unspool_many({"a": 0, "c": stamps["c"][0]}, limit=2, raw=True)
    assert [json.loads(m)["timestamp"] for m in limited["a"]] == stamps["a"][:2]
    assert [json.loads(m)["timestamp"] for m in limited["c"]] == stamps["c"][1:3]
