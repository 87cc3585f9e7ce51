"""asyncio: ``abroadcast``, ``abroadcast_many``, ``aunspool``, ``aunspool_many``, ``areplay``,
``aprune_replay_logs`` and ``asubscribe``, on ``ReplayLog`` and at module level.

pytest-asyncio is not used: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from typing import Any

import pytest
import redis
from conftest import LatencyProxy, contents

import replaylog

# --------------------------------------------------------------------------- helpers


async def wait_for(condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never became true within {timeout}s")
        await asyncio.sleep(0.005)


def stamps(messages: list[dict[str, Any]]) -> list[int]:
    return [m["timestamp"] for m in messages]


class Ticker:
    """A 1 ms ticker on the running loop that records the largest extra delay between ticks."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - before - 0.001)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)  # let it tick before the load starts
        self.worst = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task


# --------------------------------------------------------------------------- the event loop


# Redis holds writes this long while the loop is watched: a call that waited for Redis on the
# loop would stall it at least this long, far more than any busy machine adds.
PAUSE_MS = 400


async def blocking_stall(replay_log: replaylog.ReplayLog, rdb: redis.Redis, channel: str) -> float:
    """The control: the loop's worst stall while one synchronous broadcast waits out a pause."""
    async with Ticker() as ticker:
        rdb.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        replay_log.broadcast(channel, "e", 0)
        await asyncio.sleep(0.005)
    return ticker.worst


def test_event_loop_stays_responsive_with_1000_abroadcasts_in_flight(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    # The cause, not a duration: while Redis holds every write for PAUSE_MS, 1,000 abroadcasts
    # wait on it and the loop keeps ticking. What stalls it then is this process's own CPU work
    # (a busy machine only adds to that, hence the best of three rounds), far below the pause
    # that a call waiting on the loop would add; the control shows that one.
    async def round_(channel: str) -> tuple[float, list[int]]:
        async with Ticker() as ticker:
            rdb.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            results = await asyncio.gather(
                *(replay_log.abroadcast(channel, "e", {"i": i}) for i in range(1000))
            )
        assert ticker.ticks > 0
        return ticker.worst, list(results)

    async def main() -> tuple[float, list[tuple[float, list[int]]]]:
        await replay_log.abroadcast("warm-up", "e", 0)  # connect before measuring
        control = await blocking_stall(replay_log, rdb, "loop-control")
        return control, [await round_(f"loop-{r}") for r in range(3)]

    gc.collect()
    control, rounds = asyncio.run(main())
    best = min(worst for worst, _ in rounds)
    assert control >= PAUSE_MS / 1000 * 0.9
    assert best < PAUSE_MS / 1000 / 2, f"stalled {best * 1e3:.1f} ms; blocking: {control * 1e3:.1f}"
    for r, (_, results) in enumerate(rounds):
        assert len(set(results)) == 1000
        assert rdb.zcard(f"replay:loop-{r}") == 1000


# --------------------------------------------------------------------------- asubscribe


def test_100_consumers_each_receive_a_2000_message_burst_in_order(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    consumers, total = 100, 2000

    async def consume(sub: replaylog.AsyncSubscription) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async for message in sub:
            got.append(message)
            if len(got) == total:
                break
        return got

    async def main() -> tuple[list[int], list[list[dict[str, Any]]]]:
        subs = [replay_log.asubscribe("burst") for _ in range(consumers)]
        await asyncio.gather(*(s.__aenter__() for s in subs))
        try:
            # All 100 share the log's one pub/sub connection, subscribed to the channel once.
            await wait_for(lambda: len(rdb.client_list(_type="pubsub")) == 1, what="subscribed")
            assert rdb.pubsub_numsub("mq:burst") == [(b"mq:burst", 1)]
            tasks = [asyncio.create_task(consume(s)) for s in subs]
            items = [("burst", "e", {"i": i}) for i in range(total)]
            published = await asyncio.create_task(replay_log.abroadcast_many(items))
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
        finally:
            await asyncio.gather(*(s.__aexit__(None, None, None) for s in subs))
        return published, results

    published, results = asyncio.run(main())
    assert len(published) == total
    assert len(results) == consumers
    for n, got in enumerate(results):
        assert stamps(got) == published, f"consumer {n}"
        assert [m["content"]["i"] for m in got] == list(range(total)), f"consumer {n}"
        assert all(m["channel"] == "burst" for m in got)


def test_asubscribe_replays_then_goes_live(replay_log: replaylog.ReplayLog) -> None:
    before = [replay_log.broadcast("aio-sub", "e", i) for i in range(4)]

    async def main() -> tuple[list[int], list[dict[str, Any]]]:
        got: list[dict[str, Any]] = []
        async with replay_log.asubscribe("aio-sub", since=before[0]) as sub:
            assert sub.channels == ["aio-sub"]
            live = [await replay_log.abroadcast("aio-sub", "e", i) for i in range(4, 7)]
            async for message in sub:
                got.append(message)
                if message["timestamp"] == live[-1]:
                    break
        return live, got

    live, got = asyncio.run(main())
    assert stamps(got) == before[1:] + live
    assert [m["content"] for m in got] == list(range(1, 7))


def test_async_for_without_async_with_subscribes_on_first_step(
    replay_log: replaylog.ReplayLog,
) -> None:
    ts = replay_log.broadcast("aio-first-step", "e", 1)

    async def main() -> dict[str, Any]:
        sub = replay_log.asubscribe("aio-first-step", since=0)
        with pytest.raises(RuntimeError):
            sub.channels  # noqa: B018 - not subscribed yet
        try:
            async for message in sub:
                return message
        finally:
            await sub.close()
        raise AssertionError("nothing came")

    assert asyncio.run(main())["timestamp"] == ts


def test_asubscribe_reports_a_hole_and_goes_on(
    replaylog_url: str, replay_log: replaylog.ReplayLog
) -> None:
    log = replaylog.ReplayLog(replaylog_url, max_len=2)
    before = [log.broadcast("aio-hole", "e", i) for i in range(5)]

    async def main() -> tuple[replaylog.IncompleteReplayError, list[int], list[int]]:
        async with log.asubscribe("aio-hole", since=before[0]) as sub:
            with pytest.raises(replaylog.IncompleteReplayError) as info:
                await sub.__anext__()
            after = [await log.abroadcast("aio-hole", "e", i) for i in range(5, 7)]
            got: list[int] = []
            async for message in sub:
                got.append(message["timestamp"])
                if message["timestamp"] == after[-1]:
                    break
        return info.value, after, got

    gap, after, got = asyncio.run(main())
    assert gap.channel == "aio-hole"
    assert gap.since == before[0]
    assert got == sorted(set(got))
    assert got[-2:] == after


def test_async_subscription_close_releases_its_connection(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    async def main() -> None:
        await wait_for(lambda: rdb.client_list(_type="pubsub") == [], what="no pubsub at start")
        async with replay_log.asubscribe(["aio-close-a", "aio-close-b"]) as sub:
            assert len(rdb.client_list(_type="pubsub")) == 1
        await wait_for(lambda: rdb.client_list(_type="pubsub") == [], what="pubsub released")
        assert sub.closed
        assert [m async for m in sub] == []

    asyncio.run(main())


def test_asubscribe_survives_client_kill(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    total = 1000

    async def main() -> tuple[list[int], list[dict[str, Any]]]:
        got: list[dict[str, Any]] = []
        async with replay_log.asubscribe("aio-kill", since=0) as sub:

            async def consume() -> None:
                async for message in sub:
                    got.append(message)
                    if len(got) == total:
                        return

            consumer = asyncio.create_task(consume())
            published: list[int] = []
            for i in range(total):
                published.append(await replay_log.abroadcast("aio-kill", "e", i))
                if i in (200, 500, 800):
                    await wait_for(lambda: rdb.client_list(_type="pubsub"), what="subscribed")
                    assert rdb.client_kill_filter(_type="pubsub") >= 1
            await asyncio.wait_for(consumer, timeout=30)
        return published, got

    published, got = asyncio.run(main())
    assert stamps(got) == published
    assert [m["content"] for m in got] == list(range(total))


# --------------------------------------------------------------------------- the I/O thread


def test_the_sync_api_works_from_a_finalizer_on_the_io_thread(
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


# --------------------------------------------------------------------------- sync twins


def test_async_functions_return_what_their_sync_twins_return(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    content = {"text": "héllo", "n": [1, 2.5, None, True], "big": 2**70}

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["abroadcast"] = await replay_log.abroadcast("twin-a", "e", content)
        out["abroadcast_many"] = await replay_log.abroadcast_many(
            [("twin-a", "e", content), ("twin-b", "e", content)]
        )
        out["aunspool"] = await replay_log.aunspool("twin-a", 0)
        out["aunspool_raw"] = await replay_log.aunspool("twin-a", 0, raw=True)
        out["aunspool_limit"] = await replay_log.aunspool("twin-a", 0, limit=1)
        out["aunspool_many"] = await replay_log.aunspool_many({"twin-a": 0, "twin-b": "0"})
        out["areplay"] = await replay_log.areplay("twin-a", out["abroadcast"])
        out["areplay_raw"] = await replay_log.areplay("twin-a", 0, raw=True, limit=1)
        return out

    out = asyncio.run(main())
    sync_ts = replay_log.broadcast("twin-c", "e", content)
    sync_many = replay_log.broadcast_many([("twin-c", "e", content), ("twin-d", "e", content)])

    assert isinstance(out["abroadcast"], int) and isinstance(sync_ts, int)
    assert isinstance(out["abroadcast_many"], list) and len(out["abroadcast_many"]) == 2
    assert out["abroadcast"] < out["abroadcast_many"][0]
    assert sync_ts < sync_many[0]
    # What the async calls stored is what the sync ones store, and reads agree.
    a_rows = [m for m, _ in rdb.zrange("replay:twin-a", 0, -1, withscores=True)]
    c_rows = [m for m, _ in rdb.zrange("replay:twin-c", 0, -1, withscores=True)]

    def strip(row: bytes) -> bytes:
        return row.rsplit(b',"prev":', 1)[0].rsplit(b',"timestamp":', 1)[0]

    assert [strip(row) for row in a_rows] == [strip(row) for row in c_rows]

    assert out["aunspool"] == replay_log.unspool("twin-a", 0)
    assert out["aunspool_raw"] == replay_log.unspool("twin-a", 0, raw=True)
    assert out["aunspool_limit"] == replay_log.unspool("twin-a", 0, limit=1)
    assert out["aunspool_many"] == replay_log.unspool_many({"twin-a": 0, "twin-b": "0"})
    assert out["aunspool_many"]["twin-a"][1]["content"] == content
    assert out["areplay"] == replay_log.replay("twin-a", out["abroadcast"])
    assert out["areplay"].complete is True
    assert stamps(out["areplay"].messages) == [out["abroadcast_many"][0]]
    assert out["areplay_raw"] == replay_log.replay("twin-a", 0, raw=True, limit=1)


def test_aprune_returns_what_prune_returns(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    def make_logs() -> None:
        for channel in ("prune-x", "prune-y"):
            for i in range(3):
                replay_log.broadcast(channel, "old", i)
        time.sleep(0.3)
        replay_log.broadcast("prune-x", "new", 0)

    def state() -> tuple[list[Any], list[Any], bool]:
        x = [m["content"] for m in replay_log.unspool("prune-x", 0)]
        y = [m["content"] for m in replay_log.unspool("prune-y", 0)]
        return x, y, replay_log.replay("prune-x", 0).complete

    make_logs()
    assert asyncio.run(replay_log.aprune_replay_logs(expire_ms=150)) == 6
    after_async = state()
    assert asyncio.run(replay_log.aprune_replay_logs(expire_ms=150)) == 0

    rdb.flushall()
    make_logs()
    assert replay_log.prune_replay_logs(expire_ms=150) == 6
    assert state() == after_async == ([0], [], False)


def test_async_errors_are_the_sync_errors(
    replay_log: replaylog.ReplayLog, closed_port: int
) -> None:
    async def raises(coro: Any) -> BaseException:
        try:
            await coro
        except BaseException as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    def sync_raises(call: Any) -> BaseException:
        try:
            call()
        except BaseException as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    down = replaylog.ReplayLog(
        f"redis://127.0.0.1:{closed_port}/0", connect_timeout=0.5, response_timeout=0.5
    )

    async def main() -> dict[str, BaseException]:
        return {
            "type": await raises(replay_log.abroadcast("err", "e", object())),
            "nan": await raises(replay_log.abroadcast("err", "e", float("nan"))),
            "many": await raises(replay_log.abroadcast_many([("err", "e", {1j})])),
            "since": await raises(replay_log.aunspool("err", "soon")),
            "epoch": await raises(replay_log.areplay("err", 0, epoch=5)),  # type: ignore[arg-type]
            "cursors": await raises(replay_log.aunspool_many(["err"])),  # type: ignore[arg-type]
            "down": await raises(down.abroadcast("err", "e", 1)),
            "down_unspool": await raises(down.aunspool("err", 0)),
            "down_subscribe": await raises(down.asubscribe("err").__aenter__()),
        }

    errors = asyncio.run(main())
    assert type(errors["type"]) is type(
        sync_raises(lambda: replay_log.broadcast("err", "e", object()))
    )
    assert isinstance(errors["type"], TypeError)
    assert "object" in str(errors["type"])
    assert isinstance(errors["nan"], ValueError)
    assert type(errors["nan"]) is type(
        sync_raises(lambda: replay_log.broadcast("err", "e", float("nan")))
    )
    assert isinstance(errors["many"], TypeError)
    assert isinstance(errors["since"], ValueError)
    assert type(errors["since"]) is type(sync_raises(lambda: replay_log.unspool("err", "soon")))
    assert isinstance(errors["epoch"], TypeError)
    assert isinstance(errors["cursors"], TypeError)
    for name in ("down", "down_unspool", "down_subscribe"):
        assert isinstance(errors[name], replaylog.ConnectionError), (name, errors[name])
    assert type(errors["down"]) is type(sync_raises(lambda: down.broadcast("err", "e", 1)))
    # A call that raised wrote nothing.
    assert replay_log.unspool("err", 0) == []


# --------------------------------------------------------------------------- module level


def test_module_level_async_functions_use_the_default_log(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["ts"] = await replaylog.abroadcast("mod-aio", "e", {"a": 1})
        out["many"] = await replaylog.abroadcast_many([("mod-aio", "e", 2), ("mod-aio-2", "e", 3)])
        out["unspool"] = await replaylog.aunspool("mod-aio", 0)
        out["unspool_many"] = await replaylog.aunspool_many({"mod-aio": 0, "mod-aio-2": 0})
        out["replay"] = await replaylog.areplay("mod-aio", out["ts"])
        async with replaylog.asubscribe("mod-aio", since=0) as sub:
            out["first"] = await sub.__anext__()
        out["pruned"] = await replaylog.aprune_replay_logs(expire_ms=60_000)
        return out

    out = asyncio.run(main())
    assert rdb.zcard("replay:mod-aio") == 2
    assert out["unspool"] == replay_log.unspool("mod-aio", 0)
    assert stamps(out["unspool"]) == [out["ts"], out["many"][0]]
    assert out["unspool_many"] == replay_log.unspool_many({"mod-aio": 0, "mod-aio-2": 0})
    assert out["replay"] == replay_log.replay("mod-aio", out["ts"])
    assert out["replay"].complete is True
    assert out["first"]["timestamp"] == out["ts"]
    assert out["pruned"] == 0


# --------------------------------------------------------------------------- cancellation


def test_a_cancelled_abroadcast_that_has_not_reached_redis_never_does(
    replaylog_redis_proc: Any, rdb: redis.Redis
) -> None:
    # Through a link of 0.5 s each way, connecting (the HELLO handshake) takes a second: a
    # cancel 0.2 s in comes before the broadcast is written. The twin that is not cancelled
    # shows the request would have gone through.
    proxy = LatencyProxy(int(replaylog_redis_proc.port), 0.5)

    async def broadcast(channel: str, cancel: bool) -> None:
        log = replaylog.ReplayLog(proxy.url, connect_timeout=10, response_timeout=10)
        task = asyncio.create_task(log.abroadcast(channel, "e", "maybe"))
        await asyncio.sleep(0.2)
        if cancel:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task

    try:
        asyncio.run(broadcast("cancelled", cancel=True))
        asyncio.run(broadcast("awaited", cancel=False))
        time.sleep(1.5)  # anything the cancelled one had sent would have arrived by now
    finally:
        proxy.close()
    assert (rdb.zcard("replay:cancelled"), rdb.zcard("replay:awaited")) == (0, 1)
