"""``min_replicas``: a broadcast returns once that many replicas hold it, so a failover cannot
lose an acknowledged message; when they do not acknowledge in time it says so (issue 12, the
durability part). A real master and replica on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import RedisServer

import replaylog


@pytest.fixture
def master_and_replica(redis_server_factory: Any) -> Iterator[tuple[RedisServer, RedisServer]]:
    master = redis_server_factory()
    replica = redis_server_factory("--replicaof", master.host, str(master.port))
    with master.client() as client:
        deadline = time.monotonic() + 15
        while client.info("replication")["connected_slaves"] < 1:
            assert time.monotonic() < deadline, "the replica never connected"
            time.sleep(0.05)
    with replica.client() as client:
        while client.info("replication")["master_link_status"] != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
    yield master, replica


def commands(client: redis.Redis, name: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_an_acknowledged_broadcast_is_on_the_replica_when_it_returns(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = master_and_replica
    log = replaylog.ReplayLog(master.url, min_replicas=1, replica_timeout=2)
    try:
        with replica.client() as on_replica:
            for i in range(20):
                stamp = log.broadcast("room", "e", i)
                # No waiting here: the replica holds it by the time broadcast returned.
                assert on_replica.zrangebyscore("replay:room", stamp, stamp) != []
            stamps = log.broadcast_many([("room", "e", i) for i in range(5)])
            assert on_replica.zcount("replay:room", stamps[0], stamps[-1]) == 5
            stamp = asyncio.run(log.abroadcast("room", "e", "async"))
            assert on_replica.zrangebyscore("replay:room", stamp, stamp) != []
    finally:
        log.close()


def test_too_few_replicas_in_time_raise_and_say_the_message_is_on_the_master(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    master, replica = master_and_replica
    log = replaylog.ReplayLog(master.url, min_replicas=1, replica_timeout=0.3)
    assert replica.proc is not None
    try:
        log.broadcast("room", "e", "warm-up")
        replica.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(replaylog.ReplicationError, match="may not survive a failover") as info:
            log.broadcast("room", "e", "unreplicated")
        [stamp] = info.value.timestamps
        assert info.value.acknowledged == 0
        with master.client() as on_master:
            assert on_master.zrangebyscore("replay:room", stamp, stamp) != []
        with pytest.raises(replaylog.ReplicationError):
            log.broadcast_many([("room", "e", 1), ("room", "e", 2)])
    finally:
        replica.proc.send_signal(signal.SIGCONT)
        log.close()


def test_more_replicas_than_there_are_is_never_acknowledged(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    master, _ = master_and_replica
    log = replaylog.ReplayLog(master.url, min_replicas=2, replica_timeout=0.2)
    try:
        with pytest.raises(replaylog.ReplicationError) as info:
            log.broadcast("room", "e", 1)
        assert info.value.acknowledged == 1
    finally:
        log.close()


def test_without_min_replicas_no_wait_is_sent(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    assert replay_log.min_replicas == 0
    rdb.config_resetstat()
    replay_log.broadcast("room", "e", 1)
    assert commands(rdb, "wait") == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_replicas": -1}, "(?i)min_replicas"),
        ({"min_replicas": "two"}, "(?i)min_replicas"),
        ({"min_replicas": 1, "replica_timeout": 0}, "(?i)replica_timeout"),
        ({"min_replicas": 1, "replica_timeout": 5, "response_timeout": 5}, "shorter"),
    ],
)
def test_min_replicas_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(replaylog.ConfigurationError, match=message):
        replaylog.ReplayLog(**settings)


def test_min_replicas_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLAYLOG_MIN_REPLICAS", "1")
    monkeypatch.setenv("REPLAYLOG_REPLICA_TIMEOUT", "0.5")
    log = replaylog.ReplayLog()
    assert (log.min_replicas, log.replica_timeout) == (1, 0.5)


def test_every_acknowledged_broadcast_survives_the_masters_death(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # A writer broadcasts as fast as it can; the master is killed (SIGKILL, no goodbye) in the
    # middle, and its replica promoted, as a failover would. Every broadcast that returned is
    # on the new master.
    master, replica = master_and_replica
    log = replaylog.ReplayLog(
        master.url, min_replicas=1, replica_timeout=0.5, connect_timeout=0.5, response_timeout=1
    )
    acknowledged: list[int] = []
    outcomes: list[str] = []

    def write() -> None:
        for i in range(100_000):
            try:
                acknowledged.append(log.broadcast("room", "e", i))
            except replaylog.ReplayLogError as error:
                outcomes.append(type(error).__name__)
                return

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        master.stop()
        writer.join(timeout=30)
        with replica.client() as promoted:
            promoted.execute_command("REPLICAOF", "NO", "ONE")
            survived = {
                int(score) for _, score in promoted.zrange("replay:room", 0, -1, withscores=True)
            }
    finally:
        log.close()
    assert len(acknowledged) >= 200 and outcomes, (len(acknowledged), outcomes)
    assert set(acknowledged) <= survived


def lose_a_message_in_a_failover(master: RedisServer, replica: RedisServer) -> tuple[int, str, int]:
    """Without min_replicas: the replica takes over (its link to the master is gone, as in a
    partition) while the old master still acknowledges one more broadcast, then dies. Returns
    the cursor and epoch of the last message the replica got, and the lost one's timestamp."""
    before = replaylog.ReplayLog(master.url)
    seen = before.broadcast("room", "e", "replicated")
    epoch = before.replay("room", seen).epoch
    with replica.client() as client:
        deadline = time.monotonic() + 10
        while client.zcard("replay:room") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    with replica.client() as promoted:
        promoted.execute_command("REPLICAOF", "NO", "ONE")
    lost = before.broadcast("room", "e", "acknowledged, never replicated")
    master.stop()
    before.close()
    return seen, epoch, lost


def test_a_message_the_failover_lost_makes_older_cursors_incomplete(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # A message the master acknowledged but never sent to its replica is gone once the replica
    # takes over. A client that had not seen it must be told.
    master, replica = master_and_replica
    seen, epoch, lost = lose_a_message_in_a_failover(master, replica)
    after = replaylog.ReplayLog(replica.url)
    with replica.client() as promoted, promoted.pubsub() as listener:
        listener.subscribe("mq:room")
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        fresh = after.broadcast("room", "e", "after the failover")
        published = json.loads(listener.get_message(timeout=5)["data"])
    # The first message after the failover chains to the break, a timestamp of its own: a
    # subscriber still at the old newest message does not read it as the next one.
    assert published["timestamp"] == fresh and published["prev"] == seen + 1
    replayed = after.replay("room", seen, epoch=epoch)
    assert lost not in [m["timestamp"] for m in replayed.messages]
    assert replayed.complete is False
    # A cursor from after the failover is vouched for again.
    assert after.replay("room", fresh).complete is True
    later = after.broadcast("room", "e", "later")
    assert [m["timestamp"] for m in after.replay("room", fresh).messages] == [later]
    # So is a master that writes on: no break without a failover.
    assert after.replay("room", later).complete is True


def test_a_replay_before_the_new_masters_first_write_is_incomplete_too(
    master_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # The same loss, but the client comes back before anything is broadcast on the channel
    # again: the new master has not recorded the break yet, and must not vouch for the cursor.
    master, replica = master_and_replica
    seen, epoch, _ = lose_a_message_in_a_failover(master, replica)
    after = replaylog.ReplayLog(replica.url)
    replayed = after.replay("room", seen, epoch=epoch)
    assert replayed.messages == [] and replayed.complete is False
    # A subscription from that cursor, opened before the first write, is told too: the
    # first message the new master writes does not chain it past the loss.
    with after.subscribe("room", since=seen) as subscription:
        fresh = after.broadcast("room", "e", "after the failover")
        with pytest.raises(replaylog.IncompleteReplayError) as told:
            subscription.get(timeout=10)
        # Told once: it goes on from a position the new master's messages follow.
        message = subscription.get(timeout=10)
        assert message is not None and message["timestamp"] == fresh
    assert told.value.resume is not None
    again = after.replay("room", told.value.resume, epoch=told.value.epoch)
    assert again.complete is True and [m["timestamp"] for m in again.messages] == [fresh]
    assert after.replay("room", seen, epoch=epoch).complete is False
    assert after.replay("room", fresh).complete is True
