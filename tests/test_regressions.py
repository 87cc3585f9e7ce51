"""Regression tests for the defects a code review found (fixed in "Review fixes: ...").

Each test runs on a real redis-server and fails if its fix is reverted: a catch-up slower than
the subscription's 100 ms wait slice, FLUSHALL under timestamps that ran ahead of the clock,
subscriptions across a Redis restart, dict mutation and dict subclasses in the encoder,
idempotency key collisions, legacy entries and completeness, prune under short timeouts, fork
safety, setting caps, Redis's error code, malformed bookkeeping, duplicate channels, foreign
payloads, slow consumers and the sync API on replaylog's own I/O thread.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import queue
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import redis
from conftest import PublishWatcher, RedisServer, free_port, last_json_line, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replaylog

# --------------------------------------------------------------------------- helpers


class LatencyProxy:
    """A threaded TCP proxy to ``target_port`` that delays every chunk by ``delay`` seconds,
    each way (so a round trip takes at least twice that). An end of stream on either side
    is passed on (after the delay) by closing both sockets of that pair."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = free_port()
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.sockets += [client, upstream]
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, destination: socket.socket) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = chunks.get()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    if not data:
                        raise OSError("end of stream")
                    destination.sendall(data)
                except OSError:
                    for sock in (source, destination):
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@pytest.fixture
def session_port(replaylog_redis_proc: Any) -> int:
    return int(replaylog_redis_proc.port)


def proxy_to(port: int, delay: float) -> Iterator[LatencyProxy]:
    proxy = LatencyProxy(port, delay)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def slow_proxy(session_port: int) -> Iterator[LatencyProxy]:
    """80 ms each way between a log and the session redis: a 160 ms round trip."""
    yield from proxy_to(session_port, 0.08)


def drain(sub: replaylog.Subscription, wait: float = 0.5) -> list[dict[str, Any]]:
    """Everything ``sub`` delivers until nothing comes for ``wait`` seconds."""
    got = []
    while True:
        message = sub.get(timeout=wait)
        if message is None:
            return got
        got.append(message)


def receive(sub: replaylog.Subscription, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Exactly ``count`` messages (fails after ``timeout``), then checks nothing else is ready."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {count} messages came: {got[-3:]}"
        message = sub.get(timeout=min(remaining, 1.0))
        if message is not None:
            got.append(message)
    extra = sub.get(timeout=0.3)
    assert extra is None, f"an unexpected extra message: {extra}"
    return got


def contents(messages: list[dict[str, Any]]) -> list[Any]:
    return [m["content"] for m in messages]


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def is_panic(error: BaseException) -> bool:
    return type(error).__name__ == "PanicException"


# --------------------------------------------------------------------------- 1. slow catch-up


def test_catch_up_slower_than_the_wait_slice_still_delivers(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, slow_proxy: LatencyProxy
) -> None:
    """Every round trip through the proxy takes ~160 ms, longer than the 100 ms slice in
    which ``get`` waits; the catch-up after a reconnect must not be cut short each slice."""
    slow = replaylog.ReplayLog(slow_proxy.url, connect_timeout=5, response_timeout=10)
    t0 = replay_log.broadcast("room", "e", "start")
    with slow.subscribe("room", since=t0) as sub:
        replay_log.broadcast("room", "e", "live")
        assert contents(receive(sub, 1, timeout=10)) == ["live"]

        assert rdb.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        # Redis dropped the subscription's connection before these: only the log has them.
        stamps = [replay_log.broadcast("room", "e", i) for i in range(5)]

        got = receive(sub, 5, timeout=20)
    assert contents(got) == list(range(5))
    assert [m["timestamp"] for m in got] == stamps


# --------------------------------------------------------------------------- 2. FLUSHALL


def test_flushall_under_timestamps_ahead_of_the_clock_is_reported_not_dropped(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    # Each message gets its own millisecond: 20,000 of them run ~20 s ahead of the clock.
    stamps = replay_log.broadcast_many([("ahead", "e", i) for i in range(20_000)])
    assert stamps[-1] > redis_now_ms(rdb) + 5_000
    with replay_log.subscribe("ahead") as sub:
        rdb.flushall()
        # A new history: below the subscription's cursor.
        first = replay_log.broadcast("ahead", "e", "after-flush")
        assert first < stamps[-1]

        deadline = time.monotonic() + 10
        with pytest.raises(replaylog.IncompleteReplayError) as gap:
            while time.monotonic() < deadline:
                message = sub.get(timeout=0.5)
                assert message is None, f"delivered {message} instead of reporting the gap"
        assert gap.value.channel == "ahead"

        later = [replay_log.broadcast("ahead", "e", f"new-{i}") for i in range(3)]
        got = receive(sub, 3, timeout=10)
    assert contents(got) == ["new-0", "new-1", "new-2"]
    assert [m["timestamp"] for m in got] == later


# --------------------------------------------------------------------------- 3. restart


# How long Redis stays down in the restart tests: its clients notice and fail to reconnect.
OUTAGE = 1.0


def check_after_restart(got: list[Any], gaps: int, finals: list[str]) -> None:
    assert gaps <= 1, f"{gaps} IncompleteReplayErrors for one restart"
    assert got[-len(finals) :] == finals, got
    assert all(str(c).startswith(("after-", "final-")) for c in got), got
    assert len(got) == len(set(got)), f"duplicates: {got}"
    numbered = [int(str(c).split("-")[1]) for c in got if str(c).startswith("after-")]
    assert numbered == sorted(numbered), got


def send_retrying(log: replaylog.ReplayLog, content: str) -> int:
    """A broadcast, retried once on ConnectionError: the first call after a restart may fail
    (see test_first_call_after_a_restart_succeeds); the idempotency key keeps the retry from
    storing it twice. The subscription is what the restart tests are about."""
    try:
        return log.broadcast("room", "e", content, idempotency_key=content)
    except replaylog.ConnectionError:
        return log.broadcast("room", "e", content, idempotency_key=content)


async def asend_retrying(log: replaylog.ReplayLog, content: str) -> int:
    try:
        return await log.abroadcast("room", "e", content, idempotency_key=content)
    except replaylog.ConnectionError:
        return await log.abroadcast("room", "e", content, idempotency_key=content)


def test_sync_subscription_survives_a_redis_restart(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    # Another log object (its own connections) publishes, as another process would.
    writer = replaylog.ReplayLog(dedicated_redis.url)
    t0 = log.broadcast("room", "e", "before-0")
    with log.subscribe("room", since=t0) as sub:
        log.broadcast("room", "e", "before-1")
        assert contents(receive(sub, 1, timeout=10)) == ["before-1"]

        got: list[Any] = []
        gaps = 0

        def pull(seconds: float) -> None:
            nonlocal gaps
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    message = sub.get(timeout=0.1)
                except replaylog.IncompleteReplayError as gap:
                    assert gap.channel == "room"
                    gaps += 1
                    continue
                if message is not None:
                    got.append(message["content"])

        # Down for a while, as in a real restart; the consumer keeps waiting meanwhile.
        dedicated_redis.stop()
        pull(OUTAGE)
        dedicated_redis.start()  # same port, no persistence: the log is gone

        # Messages broadcast before the subscription saw the restart may be covered by the
        # gap it reports; once one arrives, everything broadcast afterwards must too.
        deadline = time.monotonic() + 20
        sent = 0
        while not got:
            assert time.monotonic() < deadline, f"nothing delivered after the restart; {gaps=}"
            send_retrying(writer, f"after-{sent}")
            sent += 1
            pull(0.4)
        finals = [f"final-{i}" for i in range(3)]
        for content in finals:
            send_retrying(writer, content)
        end = time.monotonic() + 10
        while got[-1] != finals[-1] and time.monotonic() < end:
            pull(0.2)
        pull(0.3)
    check_after_restart(got, gaps, finals)


def test_async_subscription_survives_a_redis_restart(dedicated_redis: RedisServer) -> None:
    log = replaylog.ReplayLog(dedicated_redis.url)
    # Another log object (its own connections) publishes, as another process would.
    writer = replaylog.ReplayLog(dedicated_redis.url)

    async def scenario() -> tuple[list[Any], int, list[str]]:
        t0 = await log.abroadcast("room", "e", "before-0")
        got: list[Any] = []
        gaps = 0
        async with log.asubscribe("room", since=t0) as sub:

            async def pull(seconds: float) -> None:
                nonlocal gaps
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        message = await asyncio.wait_for(sub.__anext__(), 0.1)
                    except asyncio.TimeoutError:
                        continue
                    except replaylog.IncompleteReplayError as gap:
                        assert gap.channel == "room"
                        gaps += 1
                        continue
                    except StopAsyncIteration:
                        raise AssertionError("the async iteration ended") from None
                    got.append(message["content"])

            await log.abroadcast("room", "e", "before-1")
            await pull(1.0)
            assert got == ["before-1"]
            got.clear()

            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, dedicated_redis.stop)
            await pull(OUTAGE)
            await loop.run_in_executor(None, dedicated_redis.start)

            deadline = time.monotonic() + 20
            sent = 0
            while not got:
                assert time.monotonic() < deadline, "nothing delivered after the restart"
                await asend_retrying(writer, f"after-{sent}")
                sent += 1
                await pull(0.4)
            finals = [f"final-{i}" for i in range(3)]
            for content in finals:
                await asend_retrying(writer, content)
            end = time.monotonic() + 10
            while got[-1] != finals[-1] and time.monotonic() < end:
                await pull(0.2)
            await pull(0.3)
            assert not sub.closed
        return got, gaps, finals

    check_after_restart(*asyncio.run(scenario()))


@pytest.mark.parametrize("outage", [0.0, OUTAGE], ids=["quick", "down-1s"])
@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_first_call_after_a_restart_succeeds(
    dedicated_redis: RedisServer, flavor: str, outage: float
) -> None:
    """README: "After a Redis restart the same objects work again". Redis is back (it answers
    PING) before the call, so nothing should fail."""
    log = replaylog.ReplayLog(dedicated_redis.url)

    def call(content: int) -> int:
        if flavor == "sync":
            return log.broadcast("r", "e", content)
        return asyncio.run(log.abroadcast("r", "e", content))

    call(0)
    dedicated_redis.stop()
    time.sleep(outage)
    dedicated_redis.start()
    time.sleep(0.3)
    outcomes = []
    for content in (1, 2):
        try:
            call(content)
            outcomes.append("ok")
        except replaylog.ConnectionError as error:
            outcomes.append(f"{type(error).__name__}: {error}")
    assert outcomes == ["ok", "ok"]
    assert contents(log.unspool("r")) == [1, 2]


# --------------------------------------------------------------------------- 4. dict mutation


class Opaque:
    """Something only ``default`` can encode."""


def grow(target: dict[str, Any]) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        target[f"added-{len(target)}"] = 1
        return "encoded"

    return default


def shrink(target: dict[str, Any]) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        target.pop("z", None)
        return "encoded"

    return default


@pytest.mark.parametrize("mutation", [grow, shrink], ids=["grow", "shrink"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("many", [False, True], ids=["broadcast", "broadcast_many"])
def test_default_that_mutates_the_dict_encodes_its_items_as_they_were(
    replay_log: replaylog.ReplayLog,
    mutation: Callable[[dict[str, Any]], Callable[[Any], Any]],
    nested: bool,
    many: bool,
) -> None:
    """A ``default`` that changes the dict being written: no PanicException (a BaseException
    that ``except Exception`` misses), and the dict's items as they were when its writing
    began, as ``json.dumps`` gives them before Python 3.12 (later ones write the items they
    find as they go)."""

    def make() -> tuple[dict[str, Any], Any]:
        target: dict[str, Any] = {"a": Opaque(), "b": 1, "z": 2}
        return target, ({"outer": [target]} if nested else target)

    _, unchanged = make()
    expected = json.loads(json.dumps(unchanged, default=lambda value: "encoded"))
    target, content = make()
    try:
        if many:
            replay_log.broadcast_many(
                [("m", "e", 1), ("m", "e", content)], default=mutation(target)
            )
        else:
            replay_log.broadcast("m", "e", content, default=mutation(target))
    except BaseException as error:
        assert not is_panic(error), f"a PanicException escaped: {error!r}"
        raise
    assert replay_log.unspool("m")[-1]["content"] == expected


# --------------------------------------------------------------------------- 5. dict subclasses


class HidesSecret(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return [(k, v) for k, v in super().items() if k != "secret"]


class Reversed(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return list(super().items())[::-1]


def stored_content_pairs(replay_log: replaylog.ReplayLog, channel: str) -> Any:
    [raw] = replay_log.unspool(channel, raw=True)
    return json.loads(raw, object_pairs_hook=list)[1][1]  # ("content", <pairs>)


@pytest.mark.parametrize(
    "content",
    [
        HidesSecret(a=1, secret="s3cret", b={"n": HidesSecret(secret=1, x=2)}),
        [HidesSecret(secret=True)],
        {"outer": HidesSecret(keep=1, secret=2)},
        Reversed(a=1, b=2, c=3),
    ],
    ids=["hidden-key", "in-list", "in-dict", "reordered"],
)
def test_dict_subclasses_are_encoded_through_items_like_json_dumps(
    replay_log: replaylog.ReplayLog, content: Any
) -> None:
    replay_log.broadcast("sub", "e", content)
    [message] = replay_log.unspool("sub")
    assert message["content"] == json.loads(json.dumps(content))
    assert "s3cret" not in replay_log.unspool("sub", raw=True)[0]
    expected_pairs = json.loads(json.dumps(content), object_pairs_hook=list)
    assert stored_content_pairs(replay_log, "sub") == expected_pairs


def test_ordered_dict_after_move_to_end_keeps_json_dumps_order(
    replay_log: replaylog.ReplayLog,
) -> None:
    ordered = collections.OrderedDict(a=1, b=2, c=3, d=4)
    ordered.move_to_end("a")
    ordered.move_to_end("c", last=False)
    nested = collections.OrderedDict(x=1, y=2)
    nested.move_to_end("x")
    ordered["d"] = nested
    assert list(ordered) != list(dict.__iter__(ordered))  # the dict's own order differs
    replay_log.broadcast("od", "e", ordered)
    pairs = stored_content_pairs(replay_log, "od")
    assert pairs == json.loads(json.dumps(ordered), object_pairs_hook=list)
    assert [key for key, _ in pairs] == ["c", "b", "d", "a"]
    assert pairs[2][1] == [("y", 2), ("x", 1)]


# --------------------------------------------------------------------------- 6. idempotency keys


def old_layout_twins(channel: str, key: str) -> list[tuple[str, str]]:
    """Other (channel, key) pairs the old layout, ``<channel>:<len>:<key>``, mapped to the
    same Redis key as this one."""
    name = f"{channel}:{len(channel)}:{key}"
    twins = []
    for cut in range(len(name) + 1):
        marker = f":{cut}:"
        if name[cut:].startswith(marker):
            twin = (name[:cut], name[cut + len(marker) :])
            if twin != (channel, key):
                twins.append(twin)
    return twins


def test_idempotency_keys_of_different_pairs_do_not_collide(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    assert ("a:1:", "z") in old_layout_twins("a", ":4:z")
    first = replay_log.broadcast("a", "e", 1, idempotency_key=":4:z")
    second = replay_log.broadcast("a:1:", "e", 2, idempotency_key="z")
    # Two messages (timestamps are per channel, so they may be equal).
    assert contents(replay_log.unspool("a")) == [1]
    assert contents(replay_log.unspool("a:1:")) == [2]
    assert replay_log.unspool("a:1:")[0]["timestamp"] == second
    assert len(rdb.keys("replayonce:*")) == 2
    # A retry of either is still recognised.
    assert replay_log.broadcast("a", "e", 1, idempotency_key=":4:z") == first
    assert replay_log.broadcast("a:1:", "e", 2, idempotency_key="z") == second


def test_idempotency_keys_do_not_collide_with_cluster_keys(
    replay_log: replaylog.ReplayLog, replaylog_url: str, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, cluster_keys=True)
    log.broadcast("a", "e", 1, idempotency_key=":4:z")
    log.broadcast("a:1:", "e", 2, idempotency_key="z")
    assert contents(log.unspool("a")) == [1]
    assert contents(log.unspool("a:1:")) == [2]
    assert len(rdb.keys("replayonce:*")) == 2


names = st.text(alphabet="a:1{}4", min_size=1, max_size=6)


@st.composite
def pairs_with_twins(draw: Any) -> list[tuple[str, str]]:
    pairs = draw(st.lists(st.tuples(names, names), min_size=1, max_size=6))
    for channel, key in list(pairs):
        pairs.extend(old_layout_twins(channel, key))
    return list(dict.fromkeys(pairs))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pairs=pairs_with_twins())
def test_distinct_channel_key_pairs_get_distinct_idempotency_keys(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, pairs: list[tuple[str, str]]
) -> None:
    rdb.flushall()
    for index, (channel, key) in enumerate(pairs):
        replay_log.broadcast(channel, "e", index, idempotency_key=key)
    assert len(rdb.keys("replayonce:*")) == len(pairs)
    stored = sorted(
        m["content"] for channel in {c for c, _ in pairs} for m in replay_log.unspool(channel)
    )
    assert stored == list(range(len(pairs)))


# --------------------------------------------------------------------------- 7. legacy entries


def test_legacy_entry_then_trim_is_not_reported_complete(
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


# --------------------------------------------------------------------------- 8. prune


@pytest.fixture
def short_rtt_proxy(session_port: int) -> Iterator[LatencyProxy]:
    """20 ms each way: each request well within 0.2 s, a whole prune well beyond it."""
    yield from proxy_to(session_port, 0.02)


def test_prune_of_many_logs_under_short_timeouts_completes(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, short_rtt_proxy: LatencyProxy
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


# --------------------------------------------------------------------------- 9. fork


FORK_SCRIPT = """
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


def test_fork_with_an_open_subscription(
    replay_log: replaylog.ReplayLog, replaylog_url: str
) -> None:
    proc = run_python(FORK_SCRIPT.format(url=replaylog_url), timeout=60)
    result = last_json_line(proc)
    assert result["child"] == 0, f"child: {result['child']}\n{proc.stdout}\n{proc.stderr}"
    assert result["parent"] == ["pending", "parent-after"], proc.stdout


# --------------------------------------------------------------------------- 10. setting caps


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


def test_settings_at_the_caps_work(
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


# --------------------------------------------------------------------------- 11. Redis's code


def test_refused_error_carries_redis_code(
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


# --------------------------------------------------------------------------- 12. bad bookkeeping


def test_malformed_bookkeeping_does_not_brick_the_channel(
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


@pytest.mark.parametrize("ahead_ms", [None, 10_000], ids=["1234.5", "future"])
def test_fractional_legacy_score_then_broadcasts_work(
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


# --------------------------------------------------------------------------- 13. duplicates


def test_a_channel_named_twice_delivers_each_message_once(
    replay_log: replaylog.ReplayLog,
) -> None:
    t0 = replay_log.broadcast("a", "e", "cursor")
    missed = [replay_log.broadcast("a", "e", i) for i in range(3)]
    with replay_log.subscribe(["a", "a"], since=t0) as sub:
        assert sub.channels == ["a"]
        live = replay_log.broadcast("a", "e", "live")
        got = drain(sub)
    assert [m["timestamp"] for m in got] == [*missed, live]


def test_a_channel_named_twice_with_since_none(replay_log: replaylog.ReplayLog) -> None:
    with replay_log.subscribe(["a", "b", "a"]) as sub:
        stamps = [replay_log.broadcast(c, "e", i) for i, c in enumerate("aba")]
        got = drain(sub)
    assert sorted(m["timestamp"] for m in got) == sorted(stamps)


# --------------------------------------------------------------------------- 14. foreign payloads


FOREIGN: dict[str, Callable[[int], bytes]] = {
    "not-json": lambda cursor: b"hello, not json",
    "not-json-with-timestamp": lambda cursor: f'oops "timestamp":{cursor + 1} }}'.encode(),
    "array": lambda cursor: b"[1, 2, 3]",
    "array-with-timestamp": lambda cursor: f'[{{"timestamp":{cursor + 1}}}]'.encode(),
    "string-with-timestamp": lambda cursor: json.dumps(f'"timestamp":{cursor + 2}').encode(),
    "number": lambda cursor: b"42",
    "null": lambda cursor: b"null",
    # Text that looks like the tail of the message after the cursor, in an array.
    "array-chained-to-the-cursor": lambda cursor: (
        f'[{{"x":1,"prev":{cursor},"timestamp":{cursor + 10**9}}}]'.encode()
    ),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_payloads_are_skipped(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, kind: str
) -> None:
    t0 = replay_log.broadcast("f", "e", "start")
    with replay_log.subscribe("f", since=t0) as sub:
        first = replay_log.broadcast("f", "e", "real-1")
        assert contents(receive(sub, 1, timeout=10)) == ["real-1"]
        rdb.publish("mq:f", FOREIGN[kind](first))
        real = [replay_log.broadcast("f", "e", f"real-{i}") for i in (2, 3)]
        got = drain(sub, wait=1.0)
    assert [m["timestamp"] for m in got] == real, got


# --------------------------------------------------------------------------- 15. slow consumer


def test_slow_consumer_gets_everything_once_in_order(redis_server_factory: Any) -> None:
    # A tight pub/sub output limit: if the consumer's backlog stays in Redis, Redis drops
    # the connection, and the subscription must catch up from the log.
    server = redis_server_factory("--client-output-buffer-limit", "pubsub 256kb 128kb 1")
    log = replaylog.ReplayLog(server.url)
    total = 30_000
    t0 = log.broadcast("slow", "e", -1)
    with log.subscribe("slow", since=t0) as sub:
        stamps: list[int] = []
        for start in range(0, total, 5_000):
            stamps += log.broadcast_many(
                [("slow", "e", [i, "x" * 100]) for i in range(start, start + 5_000)]
            )
        got = []
        deadline = time.monotonic() + 40
        while len(got) < total:
            assert time.monotonic() < deadline, f"only {len(got)} of {total} arrived"
            message = sub.get(timeout=1.0)
            if message is not None:
                got.append(message)
        assert sub.get(timeout=0.3) is None
    assert [m["timestamp"] for m in got] == stamps
    assert [m["content"][0] for m in got] == list(range(total))


def test_slow_consumer_backlog_is_not_all_held_in_the_process(replay_log: Any) -> None:
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


# --------------------------------------------------------------------------- 16. I/O thread


def test_sync_api_from_a_finalizer_on_the_io_thread_does_not_panic(
    replay_log: replaylog.ReplayLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    replay_log.broadcast_many([("big", "e", {"i": i}) for i in range(10_000)])
    unraisable: list[Any] = []
    thread_errors: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    main = threading.get_ident()
    finalized: list[tuple[bool, int]] = []

    class Bomb:
        """Cyclic garbage whose finalizer uses the sync API."""

        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            off_main = threading.get_ident() != main
            finalized.append((off_main, replay_log.broadcast("fin", "e", off_main)))

    async def convert_with_garbage_around() -> None:
        # The garbage collector runs in whichever thread allocates past the threshold: here
        # the I/O thread, turning 10,000 messages into dicts for the awaiting coroutine.
        for _ in range(5):
            gc.collect()
            threshold = gc.get_threshold()
            gc.set_threshold(2_000)
            try:
                bombs = [Bomb() for _ in range(5)]
                del bombs
                messages = await replay_log.aunspool("big", 0)
            finally:
                gc.set_threshold(*threshold)
            assert len(messages) == 10_000
            if any(off_main for off_main, _ in finalized):
                return

    asyncio.run(convert_with_garbage_around())
    gc.collect()
    panics = [u for u in unraisable if u.exc_type.__name__ == "PanicException"]
    assert not panics, [str(u.exc_value) for u in panics]
    assert not unraisable, [(u.exc_type, u.exc_value) for u in unraisable]
    assert not thread_errors
    assert any(off_main for off_main, _ in finalized), "no finalizer ran on the I/O thread"
    stored = replay_log.unspool("fin")
    assert [m["timestamp"] for m in stored] == [ts for _, ts in finalized]
    assert True in contents(stored)
