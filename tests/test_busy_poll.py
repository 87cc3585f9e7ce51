"""Busy polling: a synchronous call alone in its process polls for its reply instead of sleeping.

Whether a thread slept is read from its voluntary context switches (``getrusage``), a count, not a
time: a call that sleeps in ``epoll_wait`` until Redis answers adds at least one.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from conftest import SilentServer

import replaylog
from replaylog import _settings

# Each measured call first waits out a pause of Redis this long: a call that does not poll is then
# sure to sleep, and a budget of POLL_US covers it. A polling call may still sleep now and then:
# on the GIL, held by a thread of an earlier test, or after a pause that a loaded Redis overran.
PAUSE_MS = 3
POLL_US = 10_000
CALLS = 20


def sleeps_per_paused_call(call: Callable[[], Any], pauser: redis.Redis) -> float:
    """Voluntary context switches of this thread per ``call()``, each made while Redis pauses."""
    call()  # connects, and sends the idle check's PING
    switches = 0
    for _ in range(CALLS):
        pauser.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        call()
        switches += resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    return switches / CALLS


def fewest_sleeps(call: Callable[[], Any], pauser: redis.Redis, rounds: int = 3) -> float:
    """The best of a few rounds of ``sleeps_per_paused_call``: a loaded machine (Redis itself
    starved past the polling budget) only ever adds sleeps, never takes them away."""
    return min(sleeps_per_paused_call(call, pauser) for _ in range(rounds))


def broadcaster(log: replaylog.ReplayLog) -> Callable[[], Any]:
    return lambda: log.broadcast("room", "message", {"text": "hi"})


@pytest.fixture
def pauser(replaylog_url: str) -> Iterator[redis.Redis]:
    """A client for ``CLIENT PAUSE``; Redis ends a pause on its timer, so the timer runs at
    500 Hz meanwhile (at the default 10 Hz, a 3 ms pause lasts up to 100 ms)."""
    client = redis.Redis.from_url(replaylog_url)
    hz = client.config_get("hz")["hz"]
    client.config_set("hz", 500)
    yield client
    client.config_set("hz", hz)
    client.close()


def test_a_lone_call_polls_instead_of_sleeping(replaylog_url: str, pauser: redis.Redis) -> None:
    polling = replaylog.ReplayLog(replaylog_url, busy_poll_us=POLL_US)
    sleeping = replaylog.ReplayLog(replaylog_url, busy_poll_us=0)
    try:
        # A loaded machine can make a polling call sleep now and then (preempted past its
        # budget), and spare a sleeping one its sleep (preempted until the reply is in): the
        # twins are told apart by how much more the sleeping one sleeps, in the same run.
        polled = fewest_sleeps(broadcaster(polling), pauser)
        slept = sleeps_per_paused_call(broadcaster(sleeping), pauser)
        assert slept >= 0.8 and polled <= slept - 0.5, (polled, slept)
        # Replies read while polling are the same replies.
        stamp = polling.broadcast("room", "message", {"n": 1})
        [message] = polling.unspool("room", stamp - 1)
        assert (message["content"], message["timestamp"]) == ({"n": 1}, stamp)
    finally:
        polling.close()
        sleeping.close()


def test_the_default_never_polls(replaylog_url: str, pauser: redis.Redis) -> None:
    # Off by default (issue 13): polling spends a CPU on each wait, which other workers of a
    # busy host need. A default log's lone call sleeps on its reply. (A loaded machine can spare
    # a call its sleep, preempted until the reply is in, never add one: the best of 3 rounds.)
    log = replaylog.ReplayLog(replaylog_url)
    try:
        assert log.busy_poll_us == 0
        assert max(sleeps_per_paused_call(broadcaster(log), pauser) for _ in range(3)) >= 0.8
    finally:
        log.close()


def test_no_poll_while_another_thread_waits_on_redis(
    replaylog_url: str, pauser: redis.Redis, silent_server: SilentServer
) -> None:
    # A thread stuck on a Redis that never answers counts as a waiting call: polling now would
    # take the CPU from threads that need it, so this thread sleeps on its replies.
    hung = replaylog.ReplayLog(
        f"redis://127.0.0.1:{silent_server.port}/0", connect_timeout=3, response_timeout=3
    )
    log = replaylog.ReplayLog(replaylog_url, busy_poll_us=POLL_US)
    errors: list[BaseException] = []

    def wait_on_hung() -> None:
        try:
            hung.broadcast("room", "message", {})
        except replaylog.ReplayLogError as error:
            errors.append(error)

    try:
        broadcaster(log)()
        waiter = threading.Thread(target=wait_on_hung)
        waiter.start()
        assert silent_server.got_data.wait(2)
        assert sleeps_per_paused_call(broadcaster(log), pauser) >= 0.8
        assert waiter.is_alive()
        waiter.join()
        assert errors and isinstance(errors[0], (replaylog.TimeoutError, replaylog.ConnectionError))
        # Alone again: polling is back.
        assert fewest_sleeps(broadcaster(log), pauser) <= 0.5
    finally:
        hung.close()
        log.close()


def test_replies_slower_than_the_budget_stop_the_polling(
    replaylog_url: str, pauser: redis.Redis
) -> None:
    # Past a remote Redis's round trip, polling only burns CPU: after a call that waited longer
    # than the budget, the next one sleeps. Each call here waits out a 50 ms pause; polling 10 ms
    # on each would burn 100 ms of this thread's CPU on a quiet machine (50 with half a CPU),
    # stopping after the first burns about 10. The twin that never polls is the control.
    def cpu_of_slow_calls(log: replaylog.ReplayLog) -> float:
        call = broadcaster(log)
        call()
        cpu_before = time.thread_time()
        for _ in range(10):
            pauser.execute_command("CLIENT", "PAUSE", "50", "ALL")
            call()
        return time.thread_time() - cpu_before

    log = replaylog.ReplayLog(replaylog_url, busy_poll_us=POLL_US)
    never_polls = replaylog.ReplayLog(replaylog_url, busy_poll_us=0)
    try:
        extra_cpu = cpu_of_slow_calls(log) - cpu_of_slow_calls(never_polls)
        assert extra_cpu < 0.030, f"{extra_cpu * 1e3:.1f} ms of CPU spent polling"
        # Replies within the budget turn polling back on.
        assert fewest_sleeps(broadcaster(log), pauser) <= 0.5
    finally:
        log.close()
        never_polls.close()


@pytest.mark.parametrize("value", [-1, 10_001, 1.5, True, "fast", None])
def test_busy_poll_us_must_be_microseconds_within_bounds(value: Any) -> None:
    if value is None:
        # None means "look it up": the default.
        assert replaylog.ReplayLog().busy_poll_us == _settings.DEFAULT_BUSY_POLL_US
        return
    with pytest.raises(replaylog.ConfigurationError, match="(?i)busy_poll_us"):
        replaylog.ReplayLog(busy_poll_us=value)


def test_busy_poll_us_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAYLOG_BUSY_POLL_US", "0")
    assert replaylog.ReplayLog().busy_poll_us == 0
    monkeypatch.setenv("REPLAYLOG_BUSY_POLL_US", " 750 ")
    assert replaylog.ReplayLog().busy_poll_us == 750
    monkeypatch.setenv("REPLAYLOG_BUSY_POLL_US", "-5")
    with pytest.raises(replaylog.ConfigurationError, match="REPLAYLOG_BUSY_POLL_US"):
        replaylog.ReplayLog()
