"""The article's Redis layout, both ways: what we write, legacy readers read; what the article's
own code wrote, we read and prune."""

from __future__ import annotations

import json
import time

import pytest
import redis
from conftest import (
    PublishWatcher,
    article_broadcast,
    contents,
    redis_now_ms,
    stored_members,
)

import replaylog


def test_plain_subscriber_on_mq_channel_gets_the_message(rdb: redis.Redis) -> None:
    pubsub = rdb.pubsub()
    pubsub.subscribe("mq:room-1")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    content = {"text": "hello", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    ts = replaylog.broadcast("room-1", "chat.message", content)

    msg = None
    deadline = time.monotonic() + 10
    while msg is None and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1)
    pubsub.close()
    assert msg is not None, "nothing was published on mq:room-1"
    assert msg["type"] == "message"
    assert msg["channel"] == b"mq:room-1"
    payload = json.loads(msg["data"])
    assert payload["event_name"] == "chat.message"
    assert payload["content"] == content
    assert payload["timestamp"] == ts
    assert isinstance(payload["timestamp"], int)
    # What was published live is exactly what was stored in the log.
    assert stored_members(rdb, "replay:room-1") == [(msg["data"].decode(), ts)]


def test_zrangebyscore_exclusive_since_reads_our_log(rdb: redis.Redis) -> None:
    contents = [{"i": i, "word": w} for i, w in enumerate(["a", "b", "a", "c", "a"])]
    stamps = [replaylog.broadcast("room-2", "evt", c) for c in contents]

    assert rdb.type("replay:room-2") == b"zset"
    for i, since in enumerate(stamps):
        # The realtime server's unspool: ZRANGEBYSCORE replay:<channel> (since +inf
        rows = rdb.zrangebyscore("replay:room-2", f"({since}", "+inf", withscores=True)
        assert [json.loads(m)["content"] for m, _ in rows] == contents[i + 1 :]
        assert [int(s) for _, s in rows] == stamps[i + 1 :]
        assert [json.loads(m)["timestamp"] for m, _ in rows] == stamps[i + 1 :]
    rows = rdb.zrangebyscore("replay:room-2", "(0", "+inf")
    assert [json.loads(m)["event_name"] for m in rows] == ["evt"] * 5


def test_stored_message_has_the_article_fields(rdb: redis.Redis) -> None:
    ts = replaylog.broadcast("room-3", "ev", [1, "two"])
    ((member, score),) = stored_members(rdb, "replay:room-3")
    message = json.loads(member)
    assert isinstance(message, dict)
    assert message["event_name"] == "ev"
    assert message["content"] == [1, "two"]
    assert message["timestamp"] == ts == score


def test_logs_written_by_the_article_code_are_unspooled(rdb: redis.Redis) -> None:
    legacy = []
    for i in range(6):
        content = {"legacy": i, "text": "é😀"}
        legacy.append((article_broadcast(rdb, "old-room", "legacy.event", content), content))
        time.sleep(0.002)

    got = replaylog.unspool("old-room", 0)
    assert [(m["timestamp"], m["content"]) for m in got] == legacy
    assert all(m["event_name"] == "legacy.event" for m in got)

    # Resuming from a legacy cursor gives exactly what ZRANGEBYSCORE (cursor gives.
    for i, (since, _) in enumerate(legacy):
        expected = [
            json.loads(m) for m in rdb.zrangebyscore("replay:old-room", f"({since}", "+inf")
        ]
        assert replaylog.unspool("old-room", since) == expected
        assert [m["content"] for m in expected] == [c for _, c in legacy[i + 1 :]]

    raw = replaylog.unspool("old-room", 0, raw=True)
    assert raw == [m for m, _ in stored_members(rdb, "replay:old-room")]


def test_broadcast_after_legacy_entries_keeps_the_channel_ordered(rdb: redis.Redis) -> None:
    # An old app server whose clock ran a minute fast wrote the last legacy entry.
    skewed = redis_now_ms(rdb) + 60_000
    flattened = json.dumps({"event_name": "legacy", "content": 1, "timestamp": skewed})
    rdb.zadd("replay:mixed", {flattened: skewed})

    ts = replaylog.broadcast("mixed", "new", 2)
    assert ts > skewed
    after = replaylog.unspool("mixed", skewed)
    assert [(m["event_name"], m["content"]) for m in after] == [("new", 2)]


def test_prune_removes_old_legacy_entries_only(rdb: redis.Redis) -> None:
    now = redis_now_ms(rdb)
    old, fresh = [], []
    for ch in ("legacy-a", "legacy-b", "legacy-c"):
        for age in (7_200_000, 3_700_000):
            ts = now - age
            member = json.dumps({"event_name": "e", "content": [ch, age], "timestamp": ts})
            rdb.zadd(f"replay:{ch}", {member: ts})
            old.append(member)
        for age in (60_000, 0):
            ts = now - age
            member = json.dumps({"event_name": "e", "content": [ch, age], "timestamp": ts})
            rdb.zadd(f"replay:{ch}", {member: ts})
            fresh.append(member)

    assert replaylog.prune_replay_logs(3_600_000) == len(old)
    left = {
        m
        for ch in ("legacy-a", "legacy-b", "legacy-c")
        for m, _ in stored_members(rdb, f"replay:{ch}")
    }
    assert left == set(fresh)
    assert [m["content"] for m in replaylog.unspool("legacy-a", 0)] == [
        ["legacy-a", 60_000],
        ["legacy-a", 0],
    ]


def test_unicode_channel_names_use_utf8_keys(rdb: redis.Redis) -> None:
    names = ["チャット", "🚀-launch", "канал", "mixed 名前 ✓ \u00e9", "聊天室/二"]
    watcher = PublishWatcher(rdb)
    stamps = {}
    for name in names:
        stamps[name] = replaylog.broadcast(name, "uni", {"name": name})
    published = watcher.published()
    watcher.close()

    assert [ch for ch, _ in published] == [b"mq:" + n.encode("utf-8") for n in names]
    for name in names:
        key = b"replay:" + name.encode("utf-8")
        assert rdb.type(key) == b"zset"
        ((member, score),) = stored_members(rdb, key)
        assert json.loads(member)["content"] == {"name": name}
        assert score == stamps[name]
        assert [m["content"] for m in replaylog.unspool(name, 0)] == [{"name": name}]
    log_keys = {k for k in rdb.scan_iter(match=b"replay:*")}
    assert log_keys == {b"replay:" + n.encode("utf-8") for n in names}


def test_custom_prefixes_are_used_verbatim(rdb: redis.Redis, replaylog_url: str) -> None:
    log = replaylog.ReplayLog(replaylog_url, channel_prefix="chan/", log_prefix="log/")
    watcher = PublishWatcher(rdb)
    ts = log.broadcast("room", "e", 1)
    published = watcher.published()
    watcher.close()
    assert [ch for ch, _ in published] == [b"chan/room"]
    assert rdb.exists("replay:room") == 0
    assert [s for _, s in stored_members(rdb, "log/room")] == [ts]
    assert [m["content"] for m in log.unspool("room", 0)] == [1]
    # The default log (replay: prefix) does not see it.
    assert replaylog.unspool("room", 0) == []
    log.close()


def test_raw_returns_the_stored_json_strings(rdb: redis.Redis) -> None:
    contents = ["plain", {"b": 1, "a": [1.5, None]}, "ünïcødé ✓ 😀", 12345678901234567890123]
    for c in contents:
        replaylog.broadcast("raw-room", "e", c)
    stored = [m for m, _ in stored_members(rdb, "replay:raw-room")]
    raw = replaylog.unspool("raw-room", 0, raw=True)
    assert all(isinstance(r, str) for r in raw)
    assert raw == stored
    assert [json.loads(r)["content"] for r in raw] == contents


def test_five_megabyte_content_round_trips(rdb: redis.Redis) -> None:
    blob = "".join(chr(0x41 + (i * 7919) % 26) for i in range(1_000_000)) * 5
    content = {"blob": blob, "numbers": list(range(50_000)), "text": "é" * 10_000}
    ts = replaylog.broadcast("big", "blob", content)
    ((member, score),) = stored_members(rdb, "replay:big")
    assert score == ts
    assert len(member) > 5_000_000
    assert json.loads(member)["content"] == content
    (got,) = replaylog.unspool("big", 0)
    assert got["content"] == content
    assert got["timestamp"] == ts


@pytest.mark.parametrize("ahead_ms", [None, 10_000], ids=["1234.5", "future"])
def test_broadcasts_after_a_fractional_legacy_score_get_integer_timestamps_above_it(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, ahead_ms: int | None
) -> None:
    score = 1234.5 if ahead_ms is None else redis_now_ms(rdb) + ahead_ms + 0.5
    legacy = json.dumps({"event_name": "e", "content": "legacy", "timestamp": score})
    rdb.zadd("replay:frac", {legacy: score})
    stamps = [replay_log.broadcast("frac", "e", i) for i in range(3)]
    assert all(isinstance(t, int) for t in stamps)
    assert score < stamps[0] < stamps[1] < stamps[2]
    result = replay_log.replay("frac", since=stamps[0])
    assert result.complete is True
    assert contents(result.messages) == [1, 2]
    assert contents(replay_log.unspool("frac", since=score)) == [0, 1, 2]
