"""Faults against dedicated redis-servers: unreachable, hung, restarted, OOM, READONLY, NOPERM,
WRONGTYPE, and passwords that must never leak."""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from conftest import (
    PublishWatcher,
    RedisServer,
    SilentServer,
    free_port,
    redis_now_ms,
    snapshot,
)

import replaylog

# Generous upper bounds: they only show that the wait is bounded at all, not how fast it is.
SLACK = 5.0


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__])


def assert_secret_hidden(exc: BaseException, secret: str) -> None:
    for e in exception_chain(exc):
        assert secret not in str(e), f"password in str({type(e).__name__}): {e}"
        assert secret not in repr(e), f"password in repr({type(e).__name__})"
        assert secret not in repr(e.args)


def check_connection_error(exc: BaseException) -> None:
    assert isinstance(exc, replaylog.ConnectionError), repr(exc)
    assert isinstance(exc, replaylog.ReplayLogError)
    assert isinstance(exc, builtins.ConnectionError)


def calls(log: replaylog.ReplayLog) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("broadcast", lambda: log.broadcast("ch", "e", {"x": 1})),
        ("broadcast_many", lambda: log.broadcast_many([("ch", "e", 1)])),
        ("unspool", lambda: log.unspool("ch", 0)),
        ("prune", lambda: log.prune_replay_logs(1000)),
    ]


def test_unreachable_redis_raises_connection_error(closed_port: int) -> None:
    log = replaylog.ReplayLog(f"redis://127.0.0.1:{closed_port}/0", connect_timeout=0.5)
    for name, call in calls(log):
        started = time.monotonic()
        with pytest.raises(replaylog.ConnectionError) as info:
            call()
        assert time.monotonic() - started < 0.5 + SLACK, name
        check_connection_error(info.value)


def test_connect_timeout_bounds_a_connect_that_hangs(blackhole_port: int) -> None:
    log = replaylog.ReplayLog(
        f"redis://127.0.0.1:{blackhole_port}/0", connect_timeout=0.5, response_timeout=0.5
    )
    started = time.monotonic()
    with pytest.raises(replaylog.ConnectionError) as info:
        log.broadcast("ch", "e", 1)
    assert time.monotonic() - started < 0.5 + SLACK
    check_connection_error(info.value)
    assert isinstance(info.value, replaylog.TimeoutError), repr(info.value)
    assert isinstance(info.value, builtins.TimeoutError)


def test_response_timeout_bounds_a_redis_that_never_answers(silent_server: SilentServer) -> None:
    log = replaylog.ReplayLog(
        f"redis://127.0.0.1:{silent_server.port}/0", connect_timeout=0.5, response_timeout=0.5
    )
    for name, call in calls(log):
        started = time.monotonic()
        with pytest.raises(replaylog.ConnectionError) as info:
            call()
        assert time.monotonic() - started < 1.0 + SLACK, name
        check_connection_error(info.value)
        assert isinstance(info.value, replaylog.TimeoutError), (name, repr(info.value))


def first_success(call: Callable[[], Any], tries: int = 25) -> tuple[Any, list[BaseException]]:
    """Retry ``call`` on ConnectionError with short sleeps; return its result and the errors."""
    errors: list[BaseException] = []
    for _ in range(tries):
        try:
            return call(), errors
        except replaylog.ConnectionError as exc:
            errors.append(exc)
            time.sleep(0.2)
    raise AssertionError(f"never worked again: {errors!r}")


def test_the_same_log_works_again_after_a_redis_restart(
    dedicated_redis: RedisServer, clean_default: pytest.MonkeyPatch
) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url, connect_timeout=0.5, response_timeout=2)
    replaylog.configure(url=dedicated_redis.url, connect_timeout=0.5, response_timeout=2)
    first = log.broadcast("ch", "e", "before")
    replaylog.broadcast("ch", "e", "before, module")
    assert len(log.unspool("ch", 0)) == 2

    dedicated_redis.restart()  # same port, empty dataset, empty script cache

    # restart() can take less than the 100 ms after which a connection is checked before use
    # (test_idle_calls), so the first call may still meet the old connection: at most once.
    ts, errors = first_success(lambda: log.broadcast("ch", "e", "after"))
    assert len(errors) <= 1, errors
    for exc in errors:
        check_connection_error(exc)
    assert isinstance(ts, int)
    ts2, errors = first_success(lambda: replaylog.broadcast("ch", "e", "after, module"))
    assert len(errors) <= 1, errors
    assert ts2 > ts
    assert [m["content"] for m in log.unspool("ch", 0)] == ["after", "after, module"]
    assert [m["timestamp"] for m in replaylog.unspool("ch", 0)] == [ts, ts2]
    assert log.prune_replay_logs(3_600_000) == 0
    assert first > 0


def test_calls_fail_while_redis_is_down_and_work_once_it_is_back(
    dedicated_redis: RedisServer,
) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url, connect_timeout=0.5, response_timeout=2)
    log.broadcast("ch", "e", 1)
    dedicated_redis.stop()
    for name, call in calls(log):
        started = time.monotonic()
        with pytest.raises(replaylog.ConnectionError) as info:
            call()
        assert time.monotonic() - started < 2.5 + SLACK, name
        check_connection_error(info.value)
    dedicated_redis.start()
    # The calls that failed left no connection behind: the next one connects afresh.
    ts, errors = first_success(lambda: log.broadcast("ch", "e", 2))
    assert errors == []
    assert [m["timestamp"] for m in log.unspool("ch", 0)] == [ts]


def test_a_flushed_script_cache_is_invisible(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    a = log.broadcast("ch", "e", 1)
    with dedicated_redis.client() as client:
        client.script_flush()
        b = log.broadcast("ch", "e", 2)  # NOSCRIPT must be handled, not raised
        assert b > a
        assert client.zcard("replay:ch") == 2
        assert [m["content"] for m in log.unspool("ch", 0)] == [1, 2]


def test_out_of_memory_raises_and_writes_nothing(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    client = dedicated_redis.client()
    log.broadcast("ch", "seed", 0)
    for i in range(30):
        client.set(f"fill:{i}", "x" * 100_000)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1mb")
    watcher = PublishWatcher(client)
    before = snapshot(client)

    with pytest.raises(replaylog.OutOfMemoryError) as info:
        log.broadcast("ch", "e", {"payload": "y" * 10_000})
    assert isinstance(info.value, replaylog.RedisRefusedError)
    assert isinstance(info.value, replaylog.ReplayLogError)
    assert info.value.code == "OOM"
    assert "\"OOM\": command not allowed when used memory > 'maxmemory'" in str(info.value)
    with pytest.raises(replaylog.OutOfMemoryError):
        log.broadcast("fresh-channel", "e", 1)
    with pytest.raises(replaylog.OutOfMemoryError):
        log.broadcast_many([("ch", "e", 1), ("other", "e", 2)])

    assert watcher.published() == []
    assert snapshot(client) == before
    assert [m["event_name"] for m in log.unspool("ch", 0)] == ["seed"]

    client.config_set("maxmemory", "0")
    ts = log.broadcast("ch", "e", "works again")
    assert [m["timestamp"] for m in log.unspool("ch", 0)][-1] == ts
    watcher.close()
    client.close()


def test_read_only_replica_raises_and_writes_nothing(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    client = dedicated_redis.client()
    log.broadcast("ch", "seed", 0)
    old = redis_now_ms(client) - 10 * 3_600_000
    client.zadd("replay:ch", {json.dumps({"event_name": "o", "content": 0, "timestamp": old}): old})
    client.replicaof("127.0.0.1", free_port())  # a master that is never there
    deadline = time.monotonic() + 10
    while client.role()[0] != b"slave" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.role()[0] == b"slave"
    watcher = PublishWatcher(client)
    before = snapshot(client)

    with pytest.raises(replaylog.ReadOnlyError) as info:
        log.broadcast("ch", "e", 1)
    assert isinstance(info.value, replaylog.RedisRefusedError)
    assert info.value.code == "READONLY"
    assert "read" in str(info.value).lower()
    with pytest.raises(replaylog.ReadOnlyError):
        log.broadcast("new-channel", "e", 1)
    with pytest.raises(replaylog.ReadOnlyError):
        log.prune_replay_logs(3_600_000)

    assert watcher.published() == []
    assert snapshot(client) == before

    client.replicaof("NO", "ONE")
    ts = log.broadcast("ch", "e", "primary again")
    assert log.unspool("ch", 0)[-1]["timestamp"] == ts
    watcher.close()
    client.close()


ACL_USERS = {
    # name: (key patterns, command rules)
    "keys-elsewhere": (["allowed:*"], ["+@all"]),
    "no-scripts": (["*"], ["+@all", "-@scripting"]),
    "no-writes": (["*"], ["+@all", "-@write"]),
}


@pytest.mark.parametrize("user", sorted(ACL_USERS))
def test_acl_refusal_raises_permission_denied_and_writes_nothing(
    dedicated_redis: RedisServer, user: str
) -> None:
    secret = "acl-s3cret-pw"
    keys, commands = ACL_USERS[user]
    client = dedicated_redis.client()
    client.acl_setuser(
        user, enabled=True, passwords=[f"+{secret}"], keys=keys, channels=["*"], commands=commands
    )
    now = redis_now_ms(client)
    old = now - 10 * 3_600_000
    client.zadd("replay:ch", {json.dumps({"event_name": "o", "content": 0, "timestamp": old}): old})
    log = replaylog.ReplayLog(f"redis://{user}:{secret}@127.0.0.1:{dedicated_redis.port}/0")
    assert secret not in repr(log)
    watcher = PublishWatcher(client)
    before = snapshot(client)

    with pytest.raises(replaylog.PermissionDeniedError) as info:
        log.broadcast("ch", "e", 1)
    assert isinstance(info.value, replaylog.RedisRefusedError)
    assert isinstance(info.value, replaylog.ReplayLogError)
    assert info.value.code == "NOPERM"
    assert_secret_hidden(info.value, secret)
    if user == "no-writes":  # the others may still trim: prune runs no script
        with pytest.raises(replaylog.PermissionDeniedError):
            log.prune_replay_logs(3_600_000)

    assert watcher.published() == []
    assert snapshot(client) == before
    watcher.close()
    client.close()


def test_password_in_url_never_leaks_when_unreachable(closed_port: int) -> None:
    secret = "s3cret-pw"
    for url in (
        f"redis://:{secret}@127.0.0.1:{closed_port}/0",
        f"redis://someone:{secret}@127.0.0.1:{closed_port}/0",
    ):
        log = replaylog.ReplayLog(url, connect_timeout=0.5)
        assert secret not in repr(log)
        assert secret not in str(log)
        assert secret not in log.url
        for _, call in calls(log):
            with pytest.raises(replaylog.ConnectionError) as info:
                call()
            assert_secret_hidden(info.value, secret)


def test_wrong_password_is_refused_without_leaking_it(redis_server_factory: Any) -> None:
    server = redis_server_factory("--requirepass", "right-pw-123", password="right-pw-123")
    wrong = "wr0ng-s3cret"
    for url in (
        f"redis://:{wrong}@127.0.0.1:{server.port}/0",
        f"redis://default:{wrong}@127.0.0.1:{server.port}/0",
    ):
        log = replaylog.ReplayLog(url, connect_timeout=1, response_timeout=2)
        assert wrong not in repr(log)
        with pytest.raises(replaylog.ReplayLogError) as info:
            log.broadcast("ch", "e", 1)
        assert_secret_hidden(info.value, wrong)
        with server.client() as client:
            assert client.dbsize() == 0

    good = replaylog.ReplayLog(f"redis://:right-pw-123@127.0.0.1:{server.port}/0")
    assert "right-pw-123" not in repr(good)
    ts = good.broadcast("ch", "e", 1)
    assert [m["timestamp"] for m in good.unspool("ch", 0)] == [ts]


def test_malformed_url_error_hides_the_password(clean_default: pytest.MonkeyPatch) -> None:
    with pytest.raises(replaylog.ConfigurationError) as info:
        replaylog.ReplayLog("http://:leaky-pw@127.0.0.1:6379/0")
    assert isinstance(info.value, ValueError)
    assert_secret_hidden(info.value, "leaky-pw")
    clean_default.setenv("REPLAYLOG_URL", "ftp://user:leaky-pw@host/0")
    with pytest.raises(replaylog.ConfigurationError) as info:
        replaylog.broadcast("ch", "e", 1)
    assert_secret_hidden(info.value, "leaky-pw")


def test_a_refusal_carries_redis_s_error_code_and_writes_nothing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, watcher: PublishWatcher
) -> None:
    rdb.set("replay:wt", "a plain string")
    with pytest.raises(replaylog.RedisRefusedError) as refused:
        replay_log.broadcast("wt", "e", 1)
    assert refused.value.code == "WRONGTYPE"
    assert "WRONGTYPE" in str(refused.value)
    assert watcher.published() == []
    assert rdb.get("replay:wt") == b"a plain string"
    assert rdb.exists("replaymeta:wt") == 0
    # A class-level code stays for the subclasses.
    assert replaylog.OutOfMemoryError.code == "OOM"
