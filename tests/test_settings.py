"""Settings: explicit arguments, then Django settings, then the environment, then defaults; the
default log is built lazily and nothing connects at import; values past the caps are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import redis
from conftest import RedisServer, contents, last_json_line, run_python

import replaylog

ENV = {
    "REPLAYLOG_URL": "redis://10.1.2.3:7777/5",
    "EXPIRE_REPLAY_LOGS_MS": "1234",
    "REPLAYLOG_CONNECT_TIMEOUT": "0.75",
    "REPLAYLOG_RESPONSE_TIMEOUT": "3",
    "REPLAYLOG_CHANNEL_PREFIX": "envmq:",
    "REPLAYLOG_LOG_PREFIX": "envreplay:",
}


def describe(log: replaylog.ReplayLog) -> dict[str, Any]:
    return {
        "url": log.url,
        "expire_ms": log.expire_ms,
        "connect_timeout": log.connect_timeout,
        "response_timeout": log.response_timeout,
        "channel_prefix": log.channel_prefix,
        "log_prefix": log.log_prefix,
    }


def test_defaults(clean_default: pytest.MonkeyPatch) -> None:
    assert describe(replaylog.ReplayLog()) == {
        "url": "redis://localhost:6379/0",
        "expire_ms": 3_600_000,
        "connect_timeout": 2.0,
        "response_timeout": 5.0,
        "channel_prefix": "mq:",
        "log_prefix": "replay:",
    }


def test_environment_beats_defaults(clean_default: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        clean_default.setenv(name, value)
    assert describe(replaylog.ReplayLog()) == {
        "url": "redis://10.1.2.3:7777/5",
        "expire_ms": 1234,
        "connect_timeout": 0.75,
        "response_timeout": 3.0,
        "channel_prefix": "envmq:",
        "log_prefix": "envreplay:",
    }
    assert describe(replaylog.get_default()) == describe(replaylog.ReplayLog())


def test_explicit_arguments_beat_the_environment(clean_default: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        clean_default.setenv(name, value)
    log = replaylog.ReplayLog(
        "redis://127.0.0.1:6390/2",
        expire_ms=99,
        connect_timeout=0.25,
        response_timeout=1.5,
        channel_prefix="a:",
        log_prefix="b:",
    )
    assert describe(log) == {
        "url": "redis://127.0.0.1:6390/2",
        "expire_ms": 99,
        "connect_timeout": 0.25,
        "response_timeout": 1.5,
        "channel_prefix": "a:",
        "log_prefix": "b:",
    }
    configured = replaylog.configure(url="redis://127.0.0.1:6391/0", expire_ms=7)
    assert replaylog.get_default() is configured
    assert configured.url == "redis://127.0.0.1:6391/0"
    assert configured.expire_ms == 7


def test_module_level_functions_use_the_environment(
    clean_default: pytest.MonkeyPatch, replaylog_url: str, replaylog_redis_proc: Any
) -> None:
    client = redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port)
    client.flushall()
    clean_default.setenv("REPLAYLOG_URL", replaylog_url)
    clean_default.setenv("REPLAYLOG_LOG_PREFIX", "envlog:")
    clean_default.setenv("REPLAYLOG_CHANNEL_PREFIX", "envmq:")
    pubsub = client.pubsub()
    pubsub.subscribe("envmq:room")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    ts = replaylog.broadcast("room", "e", {"from": "env"})

    msg = pubsub.get_message(timeout=5)
    pubsub.close()
    assert msg is not None and msg["channel"] == b"envmq:room"
    assert json.loads(msg["data"])["timestamp"] == ts
    assert client.zrange("envlog:room", 0, -1, withscores=True)[0][1] == ts
    assert client.exists("replay:room") == 0
    assert [m["content"] for m in replaylog.unspool("room", 0)] == [{"from": "env"}]
    client.close()


def test_malformed_settings_raise_configuration_error(clean_default: pytest.MonkeyPatch) -> None:
    clean_default.setenv("REPLAYLOG_URL", "not a url")
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.broadcast("ch", "e", 1)
    clean_default.delenv("REPLAYLOG_URL")
    clean_default.setenv("REPLAYLOG_CONNECT_TIMEOUT", "-1")
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog()
    clean_default.delenv("REPLAYLOG_CONNECT_TIMEOUT")
    log = replaylog.ReplayLog("redis://127.0.0.1:1/0")
    clean_default.setenv("EXPIRE_REPLAY_LOGS_MS", "an hour")
    with pytest.raises(replaylog.ConfigurationError) as info:
        log.prune_replay_logs()
    assert isinstance(info.value, replaylog.ReplayLogError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog("redis://127.0.0.1:1/0", expire_ms=-5)


DJANGO_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["REPLAYLOG_URL"] = "redis://127.0.0.1:1/0"     # loses to Django's
    os.environ["EXPIRE_REPLAY_LOGS_MS"] = "999"               # loses to Django's
    os.environ["REPLAYLOG_CONNECT_TIMEOUT"] = "1.25"          # Django has none: env counts
    from django.conf import settings
    settings.configure(
        REPLAYLOG_URL=os.environ["DJANGO_URL"],
        EXPIRE_REPLAY_LOGS_MS=120000,
        REPLAYLOG_LOG_PREFIX="dj:",
    )
    import replaylog
    log = replaylog.ReplayLog()
    explicit = replaylog.ReplayLog("redis://127.0.0.1:2/0", expire_ms=5, log_prefix="x:")
    ts = replaylog.broadcast("djroom", "e", 1)
    print(json.dumps({
        "django": [log.url, log.expire_ms, log.log_prefix, log.connect_timeout],
        "explicit": [explicit.url, explicit.expire_ms, explicit.log_prefix],
        "ts": ts,
    }))
    """
)


def test_django_settings_beat_the_environment(rdb: redis.Redis, replaylog_url: str) -> None:
    proc = run_python(DJANGO_SCRIPT, env={"DJANGO_URL": replaylog_url}, timeout=60)
    out = last_json_line(proc)
    assert out["django"] == [replaylog_url, 120000, "dj:", 1.25]
    assert out["explicit"] == ["redis://127.0.0.1:2/0", 5, "x:"]
    assert rdb.zrange("dj:djroom", 0, -1, withscores=True)[0][1] == out["ts"]


LAZY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import replaylog
    log = replaylog.ReplayLog()
    default = replaylog.get_default()
    print(json.dumps({"django_imported": "django" in sys.modules}), flush=True)
    sys.stdin.readline()
    ts = replaylog.broadcast("lazy", "e", 1)
    print(json.dumps({"ts": ts}), flush=True)
    """
)


def test_nothing_connects_at_import_or_construction(dedicated_redis: RedisServer) -> None:
    client = dedicated_redis.client()
    client.ping()

    def connections() -> int:
        return int(client.info("stats")["total_connections_received"])

    baseline = connections()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAZY_SCRIPT],
        env={**os.environ, "REPLAYLOG_URL": dedicated_redis.url},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        assert json.loads(first) == {"django_imported": False}
        assert connections() == baseline, "replaylog connected before the first call"
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    ts = json.loads(out.strip().splitlines()[-1])["ts"]
    assert connections() > baseline
    assert client.zrange("replay:lazy", 0, -1, withscores=True)[0][1] == ts
    client.close()


@pytest.mark.parametrize(
    "setting",
    [
        {"expire_ms": 10**17},
        {"idempotency_window_ms": sys.maxsize},
        {"max_len": 10**20},
        {"expire_ms": str(10**17)},
        {"expire_ms": 1e17},
    ],
    ids=["expire_ms", "idempotency_window_ms", "max_len", "expire_ms-str", "expire_ms-float"],
)
def test_settings_beyond_the_caps_are_refused(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis, setting: Any
) -> None:
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog(replaylog_url, **setting)
    assert rdb.dbsize() == 0


@pytest.mark.parametrize(
    "variable",
    ["EXPIRE_REPLAY_LOGS_MS", "REPLAYLOG_IDEMPOTENCY_WINDOW_MS", "REPLAYLOG_MAX_LEN"],
)
def test_settings_beyond_the_caps_from_the_environment_are_refused(
    replaylog_url: str,
    replay_log: replaylog.ReplayLog,
    rdb: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, str(10**17))
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog(replaylog_url).broadcast("x", "e", 1)
    assert rdb.dbsize() == 0


def test_settings_at_the_caps_are_accepted_and_applied(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    cap = 10**13
    log = replaylog.ReplayLog(replaylog_url, expire_ms=cap, idempotency_window_ms=cap, max_len=cap)
    t1 = log.broadcast("capped", "e", 1, idempotency_key="k")
    assert log.broadcast("capped", "e", 1, idempotency_key="k") == t1
    assert 0 < rdb.pttl("replay:capped") <= cap
    assert cap < rdb.pttl("replaymeta:capped") <= 2 * cap
    assert 0 < rdb.pttl("replayonce:6:capped:k") <= cap
    assert contents(log.unspool("capped")) == [1]
