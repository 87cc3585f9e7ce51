"""prune_replay_logs: SCAN not KEYS, only old entries, only our keys, the configured expiry, and a
timeout per round trip, not for the whole walk."""

from __future__ import annotations

import json
import textwrap
import time
from typing import Any

import pytest
import redis
from conftest import FAKETIME, last_json_line, redis_now_ms, run_python, stored_members

import replaylog

HOUR = 3_600_000


def legacy_entry(client: redis.Redis, key: str | bytes, ts: int, tag: object) -> str:
    member = json.dumps({"event_name": "legacy", "content": tag, "timestamp": ts})
    client.zadd(key, {member: ts})
    return member


def test_prune_removes_only_old_entries_across_many_logs(rdb: redis.Redis) -> None:
    now = redis_now_ms(rdb)
    channels = [f"ch-{i}" for i in range(300)]
    kept: dict[str, list[str]] = {}
    for i, ch in enumerate(channels):
        legacy_entry(rdb, f"replay:{ch}", now - 3 * HOUR, [i, "old"])
        legacy_entry(rdb, f"replay:{ch}", now - HOUR - 5_000, [i, "older than an hour"])
        kept[ch] = [
            legacy_entry(rdb, f"replay:{ch}", now - HOUR + 60_000, [i, "59 min"]),
            legacy_entry(rdb, f"replay:{ch}", now, [i, "now"]),
        ]
    only_old = "replay:only-old"
    legacy_entry(rdb, only_old, now - 5 * HOUR, "gone")
    # Keys that are not logs, with old scores or old-looking data: never touched.
    legacy_entry(rdb, "other:zset", now - 5 * HOUR, "not a log")
    legacy_entry(rdb, "replay", now - 5 * HOUR, "no colon, not a log")
    legacy_entry(rdb, "xreplay:ch", now - 5 * HOUR, "prefix elsewhere")
    rdb.set("mq:ch-1", "a string")
    fresh_stamps = [replaylog.broadcast("live", "e", i) for i in range(3)]
    untouched = {k: rdb.zrange(k, 0, -1) for k in ("other:zset", "replay", "xreplay:ch")}

    removed = replaylog.prune_replay_logs(HOUR)

    assert removed == 2 * len(channels) + 1
    for ch in channels:
        assert [m for m, _ in stored_members(rdb, f"replay:{ch}")] == kept[ch]
    assert rdb.exists(only_old) == 0
    assert [m["timestamp"] for m in replaylog.unspool("live", 0)] == fresh_stamps
    for key, members in untouched.items():
        assert rdb.zrange(key, 0, -1) == members
    assert rdb.get("mq:ch-1") == b"a string"
    # Nothing left to prune.
    assert replaylog.prune_replay_logs(HOUR) == 0


def test_prune_issues_no_keys_command(rdb: redis.Redis) -> None:
    now = redis_now_ms(rdb)
    for i in range(50):
        legacy_entry(rdb, f"replay:k{i}", now - 2 * HOUR, i)
    replaylog.broadcast("warm", "e", 1)  # connection and scripts ready
    rdb.config_resetstat()

    assert replaylog.prune_replay_logs(HOUR) == 50

    stats = rdb.info("commandstats")
    assert "cmdstat_keys" not in stats, stats
    assert "cmdstat_scan" in stats, f"prune did not SCAN: {sorted(stats)}"


def test_glob_characters_in_the_log_prefix_are_escaped(
    rdb: redis.Redis, replaylog_url: str
) -> None:
    prefix = "re[p]lay*:"
    log = replaylog.ReplayLog(replaylog_url, log_prefix=prefix)
    now = redis_now_ms(rdb)
    ours = [f"{prefix}a", f"{prefix}b?", f"{prefix}[x]"]
    for key in ours:
        legacy_entry(rdb, key, now - 2 * HOUR, key)
    fresh = log.broadcast("a", "e", "fresh")
    # Each of these matches the unescaped pattern "re[p]lay*:*"; none is one of our logs.
    decoys = ["replay:a", "replayXX:a", "replay*:a", "re[p]layZ:a", "replay:"]
    for key in decoys:
        legacy_entry(rdb, key, now - 2 * HOUR, key)

    assert log.prune_replay_logs(HOUR) == len(ours)

    for key in ours[1:]:
        assert rdb.exists(key) == 0
    assert [s for _, s in stored_members(rdb, f"{prefix}a")] == [fresh]
    for key in decoys:
        assert rdb.zcard(key) == 1, key
    log.close()


def test_prune_uses_the_configured_expiry(rdb: redis.Redis, replaylog_url: str) -> None:
    now = redis_now_ms(rdb)
    for age in (10_000, 120_000, 2 * HOUR):
        legacy_entry(rdb, "replay:cfg", now - age, age)
    log = replaylog.ReplayLog(replaylog_url, expire_ms=60_000)
    assert log.expire_ms == 60_000
    assert log.prune_replay_logs() == 2
    assert [m["content"] for m in log.unspool("cfg", 0)] == [10_000]
    # An explicit argument wins over the log's setting.
    assert log.prune_replay_logs(5_000) == 1
    assert rdb.exists("replay:cfg") == 0
    log.close()


def test_prune_removes_our_own_broadcasts_once_old(rdb: redis.Redis) -> None:
    stamps = [replaylog.broadcast("aging", "e", i) for i in range(5)]
    deadline = time.monotonic() + 10
    while redis_now_ms(rdb) <= stamps[-1] + 50 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert replaylog.prune_replay_logs(HOUR) == 0
    assert replaylog.prune_replay_logs(20) == 5
    assert replaylog.unspool("aging", 0) == []


def test_module_level_prune_honours_expire_from_the_environment(
    clean_default: pytest.MonkeyPatch, replaylog_url: str, replaylog_redis_proc: object
) -> None:
    monkeypatch = clean_default
    client = redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port)
    client.flushall()
    now = redis_now_ms(client)
    for age in (5_000, 90_000, 200_000, 2 * HOUR):
        legacy_entry(client, "replay:env", now - age, age)
    monkeypatch.setenv("REPLAYLOG_URL", replaylog_url)
    monkeypatch.setenv("EXPIRE_REPLAY_LOGS_MS", "150000")

    assert replaylog.prune_replay_logs() == 2
    assert [m["content"] for m in replaylog.unspool("env", 0)] == [90_000, 5_000]

    # The expiry is read again at each prune: a changed setting counts.
    monkeypatch.setenv("EXPIRE_REPLAY_LOGS_MS", "60000")
    assert replaylog.prune_replay_logs() == 1
    replaylog.reset_default()
    monkeypatch.setenv("EXPIRE_REPLAY_LOGS_MS", "1000")
    assert replaylog.prune_replay_logs() == 1
    assert client.exists("replay:env") == 0
    client.close()


def test_module_level_prune_reads_expire_from_the_environment_in_a_fresh_process(
    rdb: redis.Redis, replaylog_url: str
) -> None:
    now = redis_now_ms(rdb)
    for age in (1_000, 30_000, 100_000):
        legacy_entry(rdb, "replay:envproc", now - age, age)
    proc = run_python(
        "import replaylog; print(replaylog.prune_replay_logs())",
        env={"REPLAYLOG_URL": replaylog_url, "EXPIRE_REPLAY_LOGS_MS": "20000"},
        timeout=60,
    )
    assert last_json_line(proc) == 2
    assert [m["content"] for m in replaylog.unspool("envproc", 0)] == [1_000]


PRUNE_SCRIPT = textwrap.dedent(
    """
    import json, time
    import replaylog
    print(json.dumps({"client_ms": int(time.time() * 1000),
                      "removed": replaylog.prune_replay_logs(3600000)}))
    """
)


def test_prune_cutoff_comes_from_the_redis_clock(rdb: redis.Redis, replaylog_url: str) -> None:
    """An app server whose clock runs two hours fast must not prune fresh entries."""
    stamps = [replaylog.broadcast("fastclock", "e", i) for i in range(3)]
    now = redis_now_ms(rdb)
    legacy_entry(rdb, "replay:fastclock", now - 2 * HOUR, "old")
    proc = run_python(
        PRUNE_SCRIPT,
        env={"REPLAYLOG_URL": replaylog_url},
        timeout=60,
        prefix=[FAKETIME, "-f", "+2h"],
    )
    out = last_json_line(proc)
    assert out["client_ms"] > now + HOUR, "faketime did not skew the child's clock"
    assert out["removed"] == 1
    assert [m["timestamp"] for m in replaylog.unspool("fastclock", 0)] == stamps


def test_a_prune_outlasting_the_call_timeouts_completes(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, latency_proxy: Any
) -> None:
    logs = 30_000
    now = redis_now_ms(rdb)
    rdb.eval(
        """
        for i = 1, tonumber(ARGV[1]) do
            redis.call('ZADD', 'replay:p' .. i, ARGV[2], 'old' .. i, ARGV[3], 'new' .. i)
        end
        """,
        0,
        logs,
        now - 2 * 3_600_000,
        now,
    )
    # 20 ms each way: each request well within 0.2 s, the whole prune well beyond it.
    short_rtt_proxy = latency_proxy(0.02)
    log = replaylog.ReplayLog(short_rtt_proxy.url, connect_timeout=0.2, response_timeout=0.2)
    started = time.monotonic()
    removed = log.prune_replay_logs(expire_ms=3_600_000)
    took = time.monotonic() - started
    assert removed == logs
    # The walk takes ~30 round trips: far longer than one connect plus one response timeout.
    assert took > 0.5, f"the prune took {took:.2f}s: too fast to tell an overall timeout apart"
    remaining = rdb.eval(
        """
        local n, old = 0, 0
        for i = 1, tonumber(ARGV[1]) do
            n = n + redis.call('ZCARD', 'replay:p' .. i)
            if redis.call('ZSCORE', 'replay:p' .. i, 'old' .. i) then old = old + 1 end
        end
        return {n, old}
        """,
        0,
        logs,
    )
    assert remaining == [logs, 0]
