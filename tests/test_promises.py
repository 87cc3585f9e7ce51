"""What the README promises, held under attack (issue 9): a poison message, bounded buffers,
bounded replays, and what a failed write means. Real redis-servers only."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import pytest
import redis

import replaylog
from replaylog import _paging


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def is_nested(value: Any, depth: int) -> bool:
    """Whether ``value`` is ``nested(depth)``, walked without recursion (``==`` would hit
    Python's own recursion limit)."""
    for _ in range(depth - 1):
        if not (isinstance(value, list) and len(value) == 1):
            return False
        value = value[0]
    return value == []


def contents(messages: list[dict[str, Any]], depth: int) -> list[Any]:
    return ["deep" if is_nested(m["content"], depth) else m["content"] for m in messages]


def next_message(sub: replaylog.Subscription) -> dict[str, Any]:
    message = sub.get(timeout=10)
    assert message is not None, "nothing arrived"
    return message


# --------------------------------------------------------------------------- 1. a poison message


@pytest.mark.parametrize("depth", [999, 1000])
def test_whatever_the_writer_accepts_every_reader_reads(
    replay_log: replaylog.ReplayLog, depth: int
) -> None:
    content = nested(depth)
    with replay_log.subscribe("deep", since=0) as live:
        first = replay_log.broadcast("deep", "e", content)
        after = replay_log.broadcast("deep", "e", "after")
        assert contents(replay_log.unspool("deep", 0), depth) == ["deep", "after"]
        assert [m["timestamp"] for m in replay_log.unspool("deep", first - 1)] == [first, after]
        replay = replay_log.replay("deep", 0)
        assert replay.complete and contents(replay.messages, depth) == ["deep", "after"]
        assert contents(replay_log.unspool_many({"deep": 0})["deep"], depth) == ["deep", "after"]
        assert contents([next_message(live), next_message(live)], depth) == ["deep", "after"]
    with replay_log.subscribe("deep", since=0) as replayed:
        got = [next_message(replayed), next_message(replayed)]
        assert contents(got, depth) == ["deep", "after"]


def test_one_level_more_is_refused_and_writes_nothing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    with pytest.raises(RecursionError, match="nested deeper than 1000 levels"):
        replay_log.broadcast("deep", "e", nested(1001))
    assert rdb.exists("replay:deep") == 0


def poison_after(rdb: redis.Redis, channel: str, prev: int) -> tuple[int, bytes]:
    """Stores and publishes, as another program might, a message with replaylog's tail that is
    not JSON; returns its timestamp and text."""
    timestamp = prev + 1
    text = f'{{"event_name":"e","content":[1,,"prev":{prev},"timestamp":{timestamp}}}'.encode()
    rdb.zadd(f"replay:{channel}", {text: timestamp})
    rdb.publish(f"mq:{channel}", text)
    return timestamp, text


def test_a_stored_message_nothing_can_read_never_makes_the_log_unreadable(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    before = replay_log.broadcast("room", "e", "before")
    poison, _ = poison_after(rdb, "room", before)
    time.sleep(0.005)  # the next broadcast's millisecond is past the poison's
    after = replay_log.broadcast("room", "e", "after")
    assert after > poison

    with caplog.at_level(logging.WARNING, logger="replaylog"):
        messages = replay_log.unspool("room", 0)
    assert [m["content"] for m in messages] == ["before", "after"]
    assert any(f"timestamp {poison}" in r.getMessage() for r in caplog.records)
    assert all("[1,," not in r.getMessage() for r in caplog.records), "content never logged"
    assert [m["content"] for m in replay_log.unspool_many({"room": 0})["room"]] == [
        "before",
        "after",
    ]
    # The client that asks for a verdict is told that it missed something.
    replay = replay_log.replay("room", 0)
    assert not replay.complete and [m["content"] for m in replay.messages] == ["before", "after"]
    assert replay_log.replay("room", poison).complete
    # raw=True forwards the text as stored: the reader on the other side decides.
    assert len(replay_log.unspool("room", 0, raw=True)) == 3


def test_a_subscription_reports_a_message_it_cannot_read_instead_of_skipping_it(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    with replay_log.subscribe("room") as live:
        before = replay_log.broadcast("room", "e", "before")
        assert next_message(live)["content"] == "before"
        poison, _ = poison_after(rdb, "room", before)
        with pytest.raises(replaylog.IncompleteReplayError) as info:
            next_message(live)
        assert (info.value.channel, info.value.since) == ("room", before)
        time.sleep(0.005)
        replay_log.broadcast("room", "e", "after")
        assert next_message(live)["content"] == "after"

    # Replayed from a cursor before it: the same report, at the same place.
    with replay_log.subscribe("room", since=0) as replayed:
        assert next_message(replayed)["content"] == "before"
        with pytest.raises(replaylog.IncompleteReplayError):
            next_message(replayed)
        assert next_message(replayed)["content"] == "after"


def test_json_that_only_json_loads_reads_is_read_as_json_loads_reads_it(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    # Deeper than replaylog writes (another program's), in an app that lets Python go deeper.
    text = '{"event_name":"e","content":' + "[" * 1100 + "]" * 1100 + ',"timestamp":5}'
    rdb.zadd("replay:foreign", {text: 5})
    recursion_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5_000)
    try:
        [message] = replay_log.unspool("foreign", 0)
    finally:
        sys.setrecursionlimit(recursion_limit)
    assert message["timestamp"] == 5 and is_nested(message["content"], 1100)


# --------------------------------------------------------------------------- 3. bytes in buffers


def test_a_stalled_subscription_holds_bytes_up_to_its_bound_then_catches_up_from_the_log(
    replaylog_url: str, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, subscription_buffer_bytes=1_000_000)
    big = "x" * 100_000
    try:
        with log.subscribe("big") as stalled, log.subscribe("big") as control:
            # 40 messages of 100 kB: far under the 10,000-message bound, 4x the byte bound.
            stamps = [log.broadcast("big", "e", {"i": i, "pad": big}) for i in range(40)]
            # The control reads them all live, so the stalled one has been offered them all.
            assert [next_message(control)["timestamp"] for _ in range(40)] == stamps
            assert 900_000 <= stalled.queued_bytes <= 1_000_000
            got = [next_message(stalled) for _ in range(40)]
            assert [m["timestamp"] for m in got] == stamps
            assert [m["content"]["i"] for m in got] == list(range(40))
            # And it goes on live, past what its queue still held (read from the log already).
            later = log.broadcast("big", "e", {"i": 40})
            assert next_message(stalled)["timestamp"] == later
            assert stalled.get(timeout=0.2) is None
    finally:
        log.close()


def test_one_message_larger_than_the_bound_still_arrives_live(
    replaylog_url: str, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, subscription_buffer_bytes=1_000)
    try:
        with log.subscribe("big") as sub:
            stamp = log.broadcast("big", "e", "y" * 5_000)
            time.sleep(0.2)
            assert sub.queued_bytes > 1_000  # queued live, not left to the log
            assert next_message(sub)["timestamp"] == stamp
    finally:
        log.close()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "lots"])
def test_the_byte_bound_and_the_replay_limit_must_be_positive_integers(value: Any) -> None:
    for name in ("subscription_buffer_bytes", "replay_limit"):
        with pytest.raises(replaylog.ConfigurationError, match=f"(?i){name}"):
            replaylog.ReplayLog(**{name: value})


def test_the_byte_bound_and_the_replay_limit_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES", "4096")
    monkeypatch.setenv("REPLAYLOG_REPLAY_LIMIT", " 25 ")
    log = replaylog.ReplayLog()
    assert (log.subscription_buffer_bytes, log.replay_limit) == (4096, 25)


def test_an_unread_subscription_holds_at_most_10000_messages_and_leaves_the_rest_in_the_log(
    replay_log: Any,
) -> None:
    """An unread subscription holds at most 10,000 messages (and its byte bound): the rest of
    the backlog is left in the log, read from there once the consumer catches up."""
    log = replay_log
    with log.subscribe("slow", since=log.broadcast("slow", "e", -1)) as sub:
        stamps = []
        for start in range(0, 30_000, 5_000):
            stamps += log.broadcast_many(
                [("slow", "e", [i, "x" * 100]) for i in range(start, start + 5_000)]
            )
        one_message = len(log.unspool("slow", stamps[-2], raw=True)[0])
        deadline = time.monotonic() + 10
        while sub.queued_bytes < 10_000 * one_message * 0.9 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the rest of the backlog has reached the process by now
        assert 0.9 * 10_000 * one_message <= sub.queued_bytes <= 10_000 * one_message
        got = [sub.get(timeout=10) for _ in range(30_000)]
        assert [m["timestamp"] for m in got if m] == stamps


# --------------------------------------------------------------------------- 4. bounded replays


def fill(rdb: redis.Redis, channel: str, count: int, replay_log: replaylog.ReplayLog) -> list[int]:
    stamps = replay_log.broadcast_many([(channel, "e", i) for i in range(count)])
    assert rdb.zcard(f"replay:{channel}") == count
    return stamps


def test_a_replay_without_a_limit_is_capped_by_the_setting_and_says_more_remain(
    replaylog_url: str, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, replay_limit=10)
    try:
        stamps = fill(rdb, "capped", 25, log)
        assert [m["content"] for m in log.unspool("capped", 0)] == list(range(10))
        assert [m["content"] for m in log.unspool_many({"capped": 0})["capped"]] == list(range(10))
        replay = log.replay("capped", 0)
        assert (len(replay.messages), replay.complete, replay.more) == (10, True, True)
        # The client goes on from its last message: the rest, and nothing more to come.
        rest = log.replay("capped", replay.messages[-1]["timestamp"], limit=100)
        assert [m["timestamp"] for m in rest.messages] == stamps[10:]
        assert (rest.complete, rest.more) == (True, False)
        exactly = log.replay("capped", stamps[14])
        assert (len(exactly.messages), exactly.more) == (10, False)
        assert log.replay("capped", 0, limit=0) == replaylog.Replay([], True, exactly.epoch, True)
    finally:
        log.close()


def zrange_calls(rdb: redis.Redis) -> int:
    stats = rdb.info("commandstats")
    return int(stats.get("cmdstat_zrangebyscore", {}).get("calls", 0))


def test_a_large_replay_is_read_in_pages(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_paging, "PAGE", 7)
    stamps = fill(rdb, "paged", 30, replay_log)
    for raw in (False, True):
        rdb.config_resetstat()
        messages = replay_log.unspool("paged", 0, raw=raw, limit=1000)
        got = [_paging.timestamp(m) for m in messages]
        assert got == stamps
        # No request asked Redis for more than a page (and the probe): five of them.
        assert zrange_calls(rdb) == 5
    assert [m["timestamp"] for m in replay_log.unspool_many({"paged": 0}, limit=1000)["paged"]] == (
        stamps
    )
    replay = replay_log.replay("paged", stamps[2], limit=20)
    assert [m["timestamp"] for m in replay.messages] == stamps[3:23]
    assert (replay.complete, replay.more) == (True, True)


def test_paging_never_splits_the_articles_messages_of_one_millisecond(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_paging, "PAGE", 4)
    # The article's code stores different messages of one millisecond under one score.
    members = {
        json.dumps({"event_name": "e", "content": i, "timestamp": score}): score
        for i, score in enumerate([1, 2, 3, 4, 4, 4, 5, 6, 6, 7])
    }
    rdb.zadd("replay:legacy", members)
    assert sorted(m["content"] for m in replay_log.unspool("legacy", 0, limit=100)) == list(
        range(10)
    )


def test_a_subscription_catches_up_from_far_behind_in_pages(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stamps = fill(rdb, "far", 2_500, replay_log)
    rdb.config_resetstat()
    with replay_log.subscribe("far", since=0) as sub:
        got = [next_message(sub)["timestamp"] for _ in range(2_500)]
        live = replay_log.broadcast("far", "e", "live")
        assert next_message(sub)["timestamp"] == live
    assert got == stamps
    evals = rdb.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert evals >= 3 + 1  # three pages of the catch-up, and the live broadcast


# --------------------------------------------------------------------------- 5. outcome unknown


def test_a_write_that_timed_out_says_its_outcome_is_unknown(dedicated_redis: Any) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url, response_timeout=0.3, busy_poll_us=0)
    control = redis.Redis(host=dedicated_redis.host, port=dedicated_redis.port)
    try:
        log.broadcast("slow", "e", "warm-up")
        control.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        with pytest.raises(replaylog.TimeoutError, match="outcome is unknown.*idempotency_key"):
            log.broadcast("slow", "e", "maybe")
        # ... and it was right not to promise anything: the write ran once Redis woke up.
        deadline = time.monotonic() + 10
        while control.zcard("replay:slow") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.zcard("replay:slow") == 2
    finally:
        control.close()
        log.close()


def test_a_refused_connection_is_not_called_unknown(closed_port: int) -> None:
    log = replaylog.ReplayLog(f"redis://127.0.0.1:{closed_port}/0", connect_timeout=0.5)
    with pytest.raises(replaylog.ConnectionError) as info:
        log.broadcast("ch", "e", 1)
    assert "unknown" not in str(info.value)


# --------------------------------------------------------------------------- 6. one budget a call


def test_after_a_quiet_spell_a_hung_redis_costs_one_response_timeout(
    dedicated_redis: Any,
) -> None:
    # Before: the idle check's PING waited a full timeout, then the request another.
    log = replaylog.ReplayLog(dedicated_redis.url, connect_timeout=1.0, response_timeout=1.0)
    try:
        log.broadcast("ch", "e", "warm-up")
        time.sleep(0.3)  # quiet: the next call checks its connection first
        dedicated_redis.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(replaylog.TimeoutError):
            log.broadcast("ch", "e", "hung")
        # One response timeout; two would be 2 s. (A busy machine only adds a little.)
        assert time.monotonic() - started < 1.6
    finally:
        dedicated_redis.proc.send_signal(signal.SIGCONT)
        log.close()


def test_a_server_that_never_answers_costs_at_most_connect_plus_response_timeout(
    silent_server: Any,
) -> None:
    # Before: the second call took twice the budget (a login retried, then the request).
    log = replaylog.ReplayLog(
        f"redis://127.0.0.1:{silent_server.port}/0", connect_timeout=1.0, response_timeout=1.0
    )
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(replaylog.ConnectionError):
                log.broadcast("ch", "e", 1)
            assert time.monotonic() - started < 2.6  # the budget is 2 s
    finally:
        log.close()
