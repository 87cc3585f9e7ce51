"""``subscribe()``: missed messages first, then live ones, with no gap and no duplicate, in order
per channel; across ``CLIENT KILL TYPE pubsub``; holes it cannot fill raise
``IncompleteReplayError``, after which iteration goes on; closing releases the connection."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable

import pytest
import redis

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
