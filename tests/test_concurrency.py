"""Threads, forked processes and skewed client clocks all keep one channel in order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from typing import Any

import redis
from conftest import FAKETIME, SilentServer, last_json_line, redis_now_ms, run_python

import replaylog


def test_16_threads_x_500_broadcasts_on_one_channel(rdb: redis.Redis) -> None:
    threads_n, per_thread = 16, 500
    barrier = threading.Barrier(threads_n)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[k] = [replaylog.broadcast("busy", f"t{k}", [k, i]) for i in range(per_thread)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a broadcasting thread hung"
    assert not errors, errors

    all_stamps = [ts for stamps in results.values() for ts in stamps]
    assert len(all_stamps) == 8000
    assert len(set(all_stamps)) == 8000
    for k, stamps in results.items():
        assert all(a < b for a, b in zip(stamps, stamps[1:])), f"thread {k} out of order"

    got = replaylog.unspool("busy", 0)
    assert len(got) == 8000
    got_stamps = [m["timestamp"] for m in got]
    assert all(a < b for a, b in zip(got_stamps, got_stamps[1:]))
    assert sorted(all_stamps) == got_stamps
    by_stamp = {m["timestamp"]: m for m in got}
    for k, stamps in results.items():
        assert [by_stamp[ts]["content"] for ts in stamps] == [[k, i] for i in range(per_thread)]
        assert {by_stamp[ts]["event_name"] for ts in stamps} == {f"t{k}"}
    assert rdb.zcard("replay:busy") == 8000


FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, traceback
    import replaylog

    CH, N = "forked", 150
    # The parent uses the module (and a ReplayLog of its own) before forking, like gunicorn
    # --preload or Celery's prefork pool.
    first = replaylog.broadcast(CH, "parent-before", 0)
    assert replaylog.unspool(CH, 0)[0]["timestamp"] == first
    log = replaylog.ReplayLog()
    log.broadcast(CH, "parent-before", 1)

    gate_r, gate_w = os.pipe()
    pids = []
    for k in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(gate_w)
                os.read(gate_r, 1)  # wait until every child exists, then all go at once
                stamps = []
                for i in range(N):
                    target = replaylog if i % 2 else log
                    stamps.append(target.broadcast(CH, f"child{k}", i))
                assert all(a < b for a, b in zip(stamps, stamps[1:])), "child order"
                mine = [m for m in log.unspool(CH, 0) if m["event_name"] == f"child{k}"]
                assert [m["timestamp"] for m in mine] == stamps, "child lost messages"
                assert [m["content"] for m in mine] == list(range(N)), "child contents"
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(gate_r)
    os.write(gate_w, b"xxxx")  # release the four children while the parent keeps working
    parent = [replaylog.broadcast(CH, "parent", i) for i in range(N)]
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    # The parent's connections survived the children's exits.
    parent.append(replaylog.broadcast(CH, "parent", N))
    parent.append(log.broadcast(CH, "parent", N + 1))
    msgs = replaylog.unspool(CH, 0)
    print(json.dumps({"codes": codes, "parent": parent, "msgs": msgs}))
    """
)


def test_forked_children_and_parent_work_at_the_same_time(
    rdb: redis.Redis, replaylog_url: str
) -> None:
    proc = run_python(FORK_SCRIPT, env={"REPLAYLOG_URL": replaylog_url}, timeout=120)
    out = last_json_line(proc)
    assert out["codes"] == [0, 0, 0, 0], proc.stderr
    msgs = out["msgs"]
    n = 150
    assert len(msgs) == 2 + 4 * n + n + 2
    stamps = [m["timestamp"] for m in msgs]
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    for k in range(4):
        mine = [m["content"] for m in msgs if m["event_name"] == f"child{k}"]
        assert mine == list(range(n))
    parent = [m for m in msgs if m["event_name"] == "parent"]
    assert [m["content"] for m in parent] == list(range(n + 2))
    assert [m["timestamp"] for m in parent] == out["parent"]
    assert rdb.zcard("replay:forked") == len(msgs)


BROADCAST_SCRIPT = textwrap.dedent(
    """
    import json, time
    import replaylog
    client_ms = int(time.time() * 1000)
    ts = replaylog.broadcast("skew", "{name}", "{name}")
    fresh = replaylog.broadcast("fresh-{name}", "{name}", 0)
    print(json.dumps({{"ts": ts, "fresh": fresh, "client_ms": client_ms}}))
    """
)


def test_a_process_with_a_skewed_clock_does_not_reorder_the_channel(
    rdb: redis.Redis, replaylog_url: str
) -> None:
    env = {"REPLAYLOG_URL": replaylog_url}
    results: dict[str, Any] = {}
    for name, prefix in (("A", None), ("B", [FAKETIME, "-f", "-30s"]), ("C", None)):
        before = redis_now_ms(rdb)
        proc = run_python(BROADCAST_SCRIPT.format(name=name), env=env, timeout=60, prefix=prefix)
        after = redis_now_ms(rdb)
        results[name] = {**last_json_line(proc), "before": before, "after": after}

    b = results["B"]
    # The test is only meaningful if B's clock really is 30 s behind Redis's.
    assert b["client_ms"] < b["before"] - 20_000, "faketime did not skew the child's clock"
    # B's timestamps come from Redis, not from its own clock.
    assert b["before"] - 1 <= b["fresh"] <= b["after"] + 1
    assert results["A"]["ts"] < b["ts"] < results["C"]["ts"]

    msgs = replaylog.unspool("skew", 0)
    assert [m["event_name"] for m in msgs] == ["A", "B", "C"]
    assert [m["timestamp"] for m in msgs] == [results[k]["ts"] for k in "ABC"]
    # A client that saw A's message resumes and misses nothing.
    assert [m["content"] for m in replaylog.unspool("skew", results["A"]["ts"])] == ["B", "C"]


def test_the_gil_is_released_while_waiting_on_redis(silent_server: SilentServer) -> None:
    """While one thread waits on a Redis that never answers, other Python threads run."""
    log = replaylog.ReplayLog(
        f"redis://127.0.0.1:{silent_server.port}/0", connect_timeout=2, response_timeout=2
    )
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            log.broadcast("gil", "e", 1)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=call)
    waiter.start()
    # The server thread needs the GIL to see the request; if the waiting call held the GIL,
    # this event could only be set after the call gave up.
    assert silent_server.got_data.wait(timeout=1.5), "the request never reached the server"
    assert waiter.is_alive(), "the call returned before the server saw it"
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], replaylog.ConnectionError), repr(outcome[0])


# One process per attempt: its runtimes and connection are made by a thread's first calls
# while the main thread forks, at a moment that moves across the attempts.
FORK_RACE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading, time
    import replaylog

    log = replaylog.ReplayLog(sys.argv[1], busy_poll_us=0)

    def first_calls():
        log.broadcast("race", "e", "parent, sync")
        asyncio.run(log.abroadcast("race", "e", "parent, async"))

    thread = threading.Thread(target=first_calls)
    thread.start()
    time.sleep(float(sys.argv[2]))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log.broadcast("race", "e", "child, sync")
            asyncio.run(log.abroadcast("race", "e", "child, async"))
            code = 0
        finally:
            os._exit(code)
    thread.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(json.dumps({"child": os.waitstatus_to_exitcode(status)}))
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        print(json.dumps({"child": "hung"}))
    """
)


def test_a_fork_racing_the_first_calls_never_leaves_the_child_hung(
    replaylog_url: str, rdb: redis.Redis
) -> None:
    # A fork while another thread held a lock (building a runtime, a connection) left that lock
    # held forever in the child: about one attempt in twenty hung before.
    outcomes = []
    for attempt in range(40):
        delay = str((attempt % 10) * 0.0005)
        proc = subprocess.run(
            [sys.executable, "-c", FORK_RACE_SCRIPT, replaylog_url, delay],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outcomes.append(last_json_line(proc)["child"])
    assert outcomes == [0] * 40
    assert rdb.zcard("replay:race") == 4 * 40


INHERITED_SUBSCRIPTION_SCRIPT = """
import json, os, time, replaylog
log = replaylog.ReplayLog({url!r})
sub = log.subscribe("f")
log.broadcast("f", "e", "x")
assert sub.get(timeout=5)["content"] == "x"
log.broadcast("f", "e", "pending")  # not read before the fork
time.sleep(0.3)
pid = os.fork()
if pid == 0:
    code = 1
    try:
        started = time.monotonic()
        message = sub.get(timeout=0.1)
        took_get = time.monotonic() - started
        started = time.monotonic()
        sub.close()
        took_close = time.monotonic() - started
        print(json.dumps({{"child_get": message, "took_get": took_get,
                          "took_close": took_close}}), flush=True)
        code = 0 if message is None and took_get < 2 and took_close < 2 else 3
    finally:
        os._exit(code)
deadline = time.monotonic() + 10
status = None
while time.monotonic() < deadline:
    done, raw = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(raw)
        break
    time.sleep(0.02)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    status = "hung"
log.broadcast("f", "e", "parent-after")
got = []
while True:
    message = sub.get(timeout=1)
    if message is None:
        break
    got.append(message["content"])
sub.close()
print(json.dumps({{"child": status, "parent": got}}), flush=True)
"""


def test_an_inherited_subscription_is_empty_in_the_child_and_intact_in_the_parent(
    replay_log: replaylog.ReplayLog, replaylog_url: str
) -> None:
    proc = run_python(INHERITED_SUBSCRIPTION_SCRIPT.format(url=replaylog_url), timeout=60)
    result = last_json_line(proc)
    assert result["child"] == 0, f"child: {result['child']}\n{proc.stdout}\n{proc.stderr}"
    assert result["parent"] == ["pending", "parent-after"], proc.stdout
