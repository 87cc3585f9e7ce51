"""``subscribe()``: missed messages first, then live ones, with no gap and no duplicate, in order
per channel; across ``CLIENT KILL TYPE pubsub``, a slow link, a Redis restart and a consumer Redis
drops for its backlog; holes it cannot fill raise ``IncompleteReplayError``, after which iteration
goes on; what others publish on the channel is skipped; closing releases the connection."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable

import pytest
import redis
from conftest import OUTAGE, RedisServer, contents, drain, receive, redis_now_ms

import replaylog

# --------------------------------------------------------------------------- helpers


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never became true within {timeout}s")
        time.sleep(0.005)


def receive_until(
    sub: replaylog.Subscription, last: dict[str, int], timeout: float = 20.0
) -> list[dict[str, Any]]:
    """Everything ``sub`` yields until, for each channel in ``last``, that timestamp arrived."""
    got: list[dict[str, Any]] = []
    pending = dict(last)
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"still waiting for {pending} after {len(got)} messages; last: {got[-3:]}"
            )
        message = sub.get(timeout=min(remaining, 1.0))
        if message is None:
            continue
        got.append(message)
        if pending.get(message["channel"]) == message["timestamp"]:
            del pending[message["channel"]]
    return got


def pubsub_clients(client: redis.Redis) -> list[dict[str, Any]]:
    return client.client_list(_type="pubsub")


def stamps(messages: Iterable[dict[str, Any]]) -> list[int]:
    return [m["timestamp"] for m in messages]


class Publisher(threading.Thread):
    """Broadcasts ``n`` messages (or until stopped) on ``channel`` as fast as it can."""

    def __init__(self, log: replaylog.ReplayLog, channel: str, n: int | None = None) -> None:
        super().__init__(daemon=True)
        self.log, self.channel, self.n = log, channel, n
        self.published: list[int] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set() and (self.n is None or i < self.n):
                self.published.append(self.log.broadcast(self.channel, "tick", i))
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def wait_published(self, count: int) -> None:
        wait_for(lambda: len(self.published) >= count or self.error, what="publishing")
        assert self.error is None, self.error

    def finish(self, stop: bool = True) -> list[int]:
        """Stops publishing (or, with ``stop=False``, lets it publish all ``n``)."""
        if stop:
            self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, self.error
        return list(self.published)


# --------------------------------------------------------------------------- basics


def test_replays_missed_messages_then_live_ones(replay_log: replaylog.ReplayLog) -> None:
    before = [replay_log.broadcast("basic", "e", {"i": i}) for i in range(5)]
    with replay_log.subscribe("basic", since=before[1]) as sub:
        assert sub.channels == ["basic"]
        live = [replay_log.broadcast("basic", "e", {"i": i}) for i in range(5, 8)]
        got = receive_until(sub, {"basic": live[-1]})
        assert sub.get(timeout=0.2) is None
    assert stamps(got) == before[2:] + live
    assert got[0] == {
        "channel": "basic",
        "event_name": "e",
        "content": {"i": 2},
        "prev": before[1],
        "timestamp": before[2],
    }
    assert [m["content"] for m in got] == [{"i": i} for i in range(2, 8)]


def test_get_returns_none_when_nothing_comes(replay_log: replaylog.ReplayLog) -> None:
    replay_log.broadcast("quiet", "e", 1)
    with replay_log.subscribe("quiet") as sub:
        assert sub.get(timeout=0.2) is None
        assert sub.get(timeout=0) is None
        ts = replay_log.broadcast("quiet", "e", 2)
        assert sub.get(timeout=5)["timestamp"] == ts
        assert sub.get(timeout=0.2) is None


def test_since_none_delivers_what_follows_subscribe_and_nothing_before(
    replay_log: replaylog.ReplayLog,
) -> None:
    earlier = [replay_log.broadcast("from-now", "e", i) for i in range(3)]
    with replay_log.subscribe("from-now") as sub:
        later = [replay_log.broadcast("from-now", "e", i) for i in range(3, 6)]
        got = receive_until(sub, {"from-now": later[-1]})
    assert stamps(got) == later
    assert not set(stamps(got)) & set(earlier)


def test_since_none_under_concurrent_publishing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    """With a publisher running all along: nothing published before subscribe() was called,
    everything published after it returned, and a gapless suffix of the log in between."""

    def newest(channel: str) -> int:
        rows = rdb.zrange(f"replay:{channel}", -1, -1, withscores=True)
        return int(rows[0][1]) if rows else 0

    for iteration in range(20):
        channel = f"now-race-{iteration}"
        publisher = Publisher(replay_log, channel)
        publisher.start()
        publisher.wait_published(5)
        before = newest(channel)
        with replay_log.subscribe(channel) as sub:
            after = newest(channel)
            publisher.wait_published(len(publisher.published) + 20)
            published = publisher.finish()
            got = receive_until(sub, {channel: published[-1]})
        log = stamps(replay_log.unspool(channel, 0))
        assert log == published
        first = got[0]["timestamp"]
        assert first > before, "a message published before subscribe() was delivered"
        assert stamps(got) == [t for t in log if t >= first], "gap or duplicate"
        assert first <= min(t for t in log if t > after), "missed a message after subscribe()"


# --------------------------------------------------------------------------- the setup race


def test_messages_published_during_setup_are_delivered_exactly_once(
    replay_log: replaylog.ReplayLog,
) -> None:
    for iteration in range(50):
        channel = f"setup-race-{iteration}"
        cursor = replay_log.broadcast(channel, "start", None)
        publisher = Publisher(replay_log, channel)
        publisher.start()
        publisher.wait_published(3)
        # Half the runs resume from the cursor, half ask for everything.
        since = cursor if iteration % 2 else 0
        with replay_log.subscribe(channel, since=since) as sub:
            publisher.wait_published(len(publisher.published) + 10)
            published = publisher.finish()
            got = receive_until(sub, {channel: published[-1]})
            assert sub.get(timeout=0.05) is None
        expected = replay_log.unspool(channel, since)
        assert stamps(expected) == ([] if since else [cursor]) + published
        assert got == [{**m, "channel": channel} for m in expected], f"iteration {iteration}"


# --------------------------------------------------------------------------- several channels


def test_several_channels_in_order_per_channel_with_a_dict_since(
    replay_log: replaylog.ReplayLog,
) -> None:
    names = ["multi-a", "multi-b", "multi-c"]

    def burst(start: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {n: [] for n in names}
        items = [(n, "e", {"n": n, "i": i}) for i in range(start, start + 10) for n in names]
        for (name, _, _), ts in zip(items, replay_log.broadcast_many(items)):
            out[name].append(ts)
        return out

    first = burst(0)
    since = {"multi-a": first["multi-a"][3], "multi-b": 0}  # multi-c: from now
    with replay_log.subscribe(names, since=since) as sub:
        assert sub.channels == names
        second = burst(10)
        got = receive_until(sub, {n: second[n][-1] for n in names})
        assert sub.get(timeout=0.2) is None

    per_channel = {n: [m for m in got if m["channel"] == n] for n in names}
    assert stamps(per_channel["multi-a"]) == first["multi-a"][4:] + second["multi-a"]
    assert stamps(per_channel["multi-b"]) == first["multi-b"] + second["multi-b"]
    assert stamps(per_channel["multi-c"]) == second["multi-c"]
    assert [m["content"]["i"] for m in per_channel["multi-a"]] == list(range(4, 20))
    assert all(m["content"]["n"] == m["channel"] for m in got)


def test_since_naming_an_unsubscribed_channel_is_refused(replay_log: replaylog.ReplayLog) -> None:
    with pytest.raises(ValueError):
        replay_log.subscribe(["a"], since={"b": 0})
    with pytest.raises(ValueError):
        replay_log.subscribe([])
    with pytest.raises(TypeError):
        replay_log.subscribe("a", since=object())  # type: ignore[arg-type]


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


def test_a_channel_named_twice_from_now_delivers_each_message_once(
    replay_log: replaylog.ReplayLog,
) -> None:
    with replay_log.subscribe(["a", "b", "a"]) as sub:
        stamps = [replay_log.broadcast(c, "e", i) for i, c in enumerate("aba")]
        got = drain(sub)
    assert sorted(m["timestamp"] for m in got) == sorted(stamps)


# --------------------------------------------------------------------------- reconnects


def test_client_kill_mid_stream_loses_and_duplicates_nothing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    total = 5000
    cursor = replay_log.broadcast("killed", "start", None)
    kills: list[int] = []
    killer_error: list[BaseException] = []
    with replay_log.subscribe("killed", since=cursor) as sub:
        publisher = Publisher(replay_log, "killed", n=total)

        def killer() -> None:
            try:
                for threshold in (500, 1500, 2500, 3500, 4500):
                    publisher.wait_published(threshold)
                    # Only kill once the subscription is connected (again).
                    wait_for(lambda: pubsub_clients(rdb), what="a pubsub client")
                    kills.append(rdb.client_kill_filter(_type="pubsub"))
            except BaseException as e:  # noqa: BLE001
                killer_error.append(e)

        kill_thread = threading.Thread(target=killer, daemon=True)
        publisher.start()
        kill_thread.start()
        got = []
        deadline = time.monotonic() + 60
        while len(got) < total and time.monotonic() < deadline:
            message = sub.get(timeout=1)
            if message is not None:
                got.append(message)
        published = publisher.finish(stop=False)
        kill_thread.join(timeout=30)
        assert sub.get(timeout=0.2) is None
    assert killer_error == []
    assert len(kills) == 5 and all(k >= 1 for k in kills), kills
    assert [m["content"] for m in got] == list(range(total))
    assert stamps(got) == published
    assert stamps(got) == stamps(replay_log.unspool("killed", cursor))


def test_client_kill_while_idle_then_messages_arrive(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    with replay_log.subscribe("idle-kill") as sub:
        for round_ in range(3):
            wait_for(lambda: pubsub_clients(rdb), what="a pubsub client")
            assert rdb.client_kill_filter(_type="pubsub") >= 1
            # Published while the subscription may be down: the log fills the hole.
            ts = [replay_log.broadcast("idle-kill", "e", (round_, i)) for i in range(3)]
            got = receive_until(sub, {"idle-kill": ts[-1]})
            assert stamps(got) == ts


def test_a_catch_up_slower_than_the_wait_slice_loses_nothing(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, latency_proxy: Any
) -> None:
    """Every round trip through the proxy takes ~160 ms, longer than the 100 ms slice in
    which ``get`` waits; the catch-up after a reconnect must not be cut short each slice."""
    slow_proxy = latency_proxy(0.08)  # a 160 ms round trip
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


def test_a_consumer_too_slow_for_redis_s_output_limit_gets_everything_once_in_order(
    redis_server_factory: Any,
) -> None:
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


def check_after_restart(got: list[Any], gaps: int, finals: list[str]) -> None:
    assert gaps <= 1, f"{gaps} IncompleteReplayErrors for one restart"
    assert got[-len(finals) :] == finals, got
    assert all(str(c).startswith(("after-", "final-")) for c in got), got
    assert len(got) == len(set(got)), f"duplicates: {got}"
    numbered = [int(str(c).split("-")[1]) for c in got if str(c).startswith("after-")]
    assert numbered == sorted(numbered), got


def send_retrying(log: replaylog.ReplayLog, content: str) -> int:
    """A broadcast, retried once on ConnectionError: one sent the moment Redis is back may
    still meet the old connection (test_idle_calls holds the call after a restart to its own
    test); the idempotency key keeps the retry from storing it twice. The subscription is what
    the restart tests are about."""
    try:
        return log.broadcast("room", "e", content, idempotency_key=content)
    except replaylog.ConnectionError:
        return log.broadcast("room", "e", content, idempotency_key=content)


async def asend_retrying(log: replaylog.ReplayLog, content: str) -> int:
    try:
        return await log.abroadcast("room", "e", content, idempotency_key=content)
    except replaylog.ConnectionError:
        return await log.abroadcast("room", "e", content, idempotency_key=content)


def test_a_subscription_goes_on_across_a_redis_restart_in_order_without_duplicates(
    dedicated_redis: RedisServer,
) -> None:
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


def test_an_async_subscription_goes_on_across_a_redis_restart_in_order_without_duplicates(
    dedicated_redis: RedisServer,
) -> None:
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


# --------------------------------------------------------------------------- holes


def test_hole_from_max_len_raises_then_iteration_goes_on(
    replaylog_url: str, replay_log: replaylog.ReplayLog
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=3)
    before = [log.broadcast("trimmed", "e", i) for i in range(6)]
    with log.subscribe("trimmed", since=before[1]) as sub:
        iterator = iter(sub)
        with pytest.raises(replaylog.IncompleteReplayError) as info:
            next(iterator)
        gap = info.value
        assert isinstance(gap, replaylog.ReplayLogError)
        assert gap.channel == "trimmed"
        assert gap.since == before[1]
        assert "trimmed" in str(gap)

        after = [log.broadcast("trimmed", "e", i) for i in range(6, 9)]
        rest = receive_until(sub, {"trimmed": after[-1]})
    # After the gap: in order, no duplicate, no second error, and every new message.
    assert stamps(rest) == sorted(set(stamps(rest)))
    assert all(t > before[1] for t in stamps(rest))
    assert stamps(rest)[-3:] == after


def test_cursor_at_the_newest_trimmed_entry_is_no_hole(
    replaylog_url: str, replay_log: replaylog.ReplayLog
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=3)
    before = [log.broadcast("edge", "e", i) for i in range(6)]
    with log.subscribe("edge", since=before[2]) as sub:
        got = receive_until(sub, {"edge": before[-1]})
        assert sub.get(timeout=0.2) is None
    assert stamps(got) == before[3:]


def test_hole_from_prune_on_one_of_several_channels(replay_log: replaylog.ReplayLog) -> None:
    old = [replay_log.broadcast("pruned-sub", "old", i) for i in range(3)]
    time.sleep(0.3)
    new = [replay_log.broadcast("pruned-sub", "new", i) for i in range(2)]
    intact = [replay_log.broadcast("intact-sub", "e", i) for i in range(3)]
    assert replay_log.prune_replay_logs(expire_ms=150) == 3

    errors: list[replaylog.IncompleteReplayError] = []
    got: list[dict[str, Any]] = []
    since = {"pruned-sub": old[0], "intact-sub": 0}
    with replay_log.subscribe(["pruned-sub", "intact-sub"], since=since) as sub:
        later = replay_log.broadcast("pruned-sub", "later", 0)
        pending = {"pruned-sub": later, "intact-sub": intact[-1]}
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            try:
                message = sub.get(timeout=1)
            except replaylog.IncompleteReplayError as gap:
                errors.append(gap)
                continue
            if message is None:
                continue
            got.append(message)
            if pending.get(message["channel"]) == message["timestamp"]:
                del pending[message["channel"]]
        assert pending == {}
    assert [(e.channel, e.since) for e in errors] == [("pruned-sub", old[0])]
    assert stamps(m for m in got if m["channel"] == "intact-sub") == intact
    pruned_got = stamps(m for m in got if m["channel"] == "pruned-sub")
    assert pruned_got[-1] == later
    assert pruned_got == sorted(set(pruned_got))
    assert not set(pruned_got) & set(old)
    assert set(pruned_got) <= set(new) | {later}


def test_hole_during_a_disconnect_raises(redis_server_factory: Any) -> None:
    """The pub/sub connection drops; while it cannot come back (its ACL user is disabled),
    a max_len=3 log is trimmed past the cursor; once it reconnects, the hole is reported."""
    server = redis_server_factory()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "sub", "on", ">subpw", "~*", "&*", "+@all")
    publisher = replaylog.ReplayLog(server.url, max_len=3, connect_timeout=2)
    subscriber = replaylog.ReplayLog(
        f"redis://sub:subpw@{server.host}:{server.port}/0", max_len=3, connect_timeout=2
    )
    try:
        start = publisher.broadcast("dropped", "e", "start")
        with subscriber.subscribe("dropped", since=start) as sub:
            cursor = publisher.broadcast("dropped", "e", "seen")
            assert sub.get(timeout=5)["timestamp"] == cursor

            admin.execute_command("ACL", "SETUSER", "sub", "off")
            assert admin.client_kill_filter(_type="pubsub") >= 1
            lost = [publisher.broadcast("dropped", "e", i) for i in range(5)]
            # The subscription could not have come back meanwhile.
            assert pubsub_clients(admin) == []
            admin.execute_command("ACL", "SETUSER", "sub", "on")

            with pytest.raises(replaylog.IncompleteReplayError) as info:
                while True:
                    message = sub.get(timeout=10)
                    assert message is not None, "the hole was never reported"
                    assert message["timestamp"] not in lost[:2], "a trimmed message came back"
            assert info.value.channel == "dropped"
            assert info.value.since == cursor

            after = publisher.broadcast("dropped", "e", "after")
            rest = receive_until(sub, {"dropped": after})
            assert stamps(rest) == sorted(set(stamps(rest)))
            assert all(t > cursor for t in stamps(rest))
    finally:
        publisher.close()
        subscriber.close()
        admin.close()


def test_a_reconnect_on_an_idle_channel_whose_log_was_emptied_reports_no_hole(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    """Subscribed "from now" to a channel whose log was pruned empty (its bookkeeping lives
    on): nothing after "now" is lost, so a reconnect must not report a hole."""
    for i in range(3):
        replay_log.broadcast("emptied", "e", i)
    time.sleep(0.3)
    assert replay_log.prune_replay_logs(expire_ms=150) == 3
    assert rdb.exists("replay:emptied") == 0
    with replay_log.subscribe("emptied") as sub:
        wait_for(lambda: pubsub_clients(rdb), what="a pubsub client")
        assert rdb.client_kill_filter(_type="pubsub") >= 1
        wait_for(lambda: pubsub_clients(rdb), what="the pubsub client back")
        assert sub.get(timeout=0.5) is None
        ts = replay_log.broadcast("emptied", "e", 3)
        assert sub.get(timeout=5)["timestamp"] == ts


def test_a_hole_is_reported_once_even_across_later_reconnects(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    """The README: it raises IncompleteReplayError once for that channel and goes on."""
    old = [replay_log.broadcast("gone", "e", i) for i in range(3)]
    time.sleep(0.3)
    assert replay_log.prune_replay_logs(expire_ms=150) == 3
    with replay_log.subscribe("gone", since=old[0]) as sub:
        with pytest.raises(replaylog.IncompleteReplayError):
            sub.get(timeout=5)
        assert sub.get(timeout=0.2) is None
        wait_for(lambda: pubsub_clients(rdb), what="a pubsub client")
        assert rdb.client_kill_filter(_type="pubsub") >= 1
        wait_for(lambda: pubsub_clients(rdb), what="the pubsub client back")
        assert sub.get(timeout=0.5) is None
        ts = replay_log.broadcast("gone", "e", 9)
        assert sub.get(timeout=5)["timestamp"] == ts


def test_a_flushall_under_timestamps_ahead_of_the_clock_is_a_hole_not_a_silent_drop(
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


# --------------------------------------------------------------------------- foreign payloads


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
def test_foreign_payloads_on_the_pubsub_channel_are_skipped(
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


# --------------------------------------------------------------------------- closing


def test_closing_releases_the_pubsub_connection(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    wait_for(lambda: pubsub_clients(rdb) == [], what="no pubsub client at the start")
    with replay_log.subscribe(["close-a", "close-b"], since=0) as sub:
        assert len(pubsub_clients(rdb)) == 1
    wait_for(lambda: pubsub_clients(rdb) == [], timeout=5, what="the pubsub client gone")
    assert sub.closed
    assert sub.get(timeout=0.1) is None
    assert list(sub) == []

    sub = replay_log.subscribe("close-c")
    assert len(pubsub_clients(rdb)) == 1
    sub.close()
    wait_for(lambda: pubsub_clients(rdb) == [], timeout=5, what="the pubsub client gone")


def test_module_level_subscribe_uses_the_default_log(replay_log: replaylog.ReplayLog) -> None:
    ts = replaylog.broadcast("module-sub", "e", 1)
    with replaylog.subscribe("module-sub", since=0) as sub:
        assert isinstance(sub, replaylog.Subscription)
        assert sub.get(timeout=5)["timestamp"] == ts


def test_subscribe_to_an_unreachable_redis_fails_with_connection_error(closed_port: int) -> None:
    log = replaylog.ReplayLog(
        f"redis://127.0.0.1:{closed_port}/0", connect_timeout=0.5, response_timeout=0.5
    )
    with pytest.raises(replaylog.ConnectionError):
        log.subscribe("nowhere")


def test_a_subscription_dropped_without_close_releases_its_connection(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    subscription = replay_log.subscribe("dropped")
    wait_for(lambda: pubsub_clients(rdb), what="a pubsub client")
    del subscription
    gc.collect()
    wait_for(lambda: not pubsub_clients(rdb), what="the pubsub client to go")
