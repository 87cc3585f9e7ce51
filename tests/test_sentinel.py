"""A real Sentinel group (1 master, 1 replica, 3 sentinels): calls and subscriptions follow a
failover by themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import RedisServer
from topology import SentinelGroup, Stream, wait_for

import replaylog

CHANNELS = ["a", "b", "c"]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    running = SentinelGroup(tmp_path)
    yield running
    running.stop()


def test_operations_through_sentinels(group: SentinelGroup) -> None:
    log = replaylog.ReplayLog(group.url)
    stamp = log.broadcast("x", "e", 1)
    assert [m["timestamp"] for m in log.unspool("x", 0)] == [stamp]
    with group.master.client() as master:
        assert master.zcard("replay:x") == 1  # on the master the sentinels name
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog(group.url.replace("sentinel_master_name=mymaster", "x=y"))
    unknown = replaylog.ReplayLog(
        group.url.replace("sentinel_master_name=mymaster", "sentinel_master_name=nope")
    )
    with pytest.raises(replaylog.ReplayLogError, match="nope"):
        unknown.broadcast("x", "e", 1)


def test_sentinels_and_nodes_behind_passwords(tmp_path: Path) -> None:
    """The nodes' password from the URL's login, the sentinels' own from `sentinel_password`;
    calls and a subscription follow a failover, and a wrong sentinel password is a clear
    error."""
    group = SentinelGroup(tmp_path, password="node-secret", sentinel_password="sentinel-secret")
    try:
        log = replaylog.ReplayLog(group.url)
        first = log.broadcast("x", "e", 1)
        with log.subscribe("x", since=first) as subscription:
            old_port = group.master_port()
            with group.sentinels[0].client() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", group.NAME)
            # Until the old master is a replica, a write may still land there, and be lost.
            wait_for(
                lambda: group.master_port() != old_port and role(group.master) == "slave",
                30,
                "the sentinels to promote the replica and demote the old master",
            )
            stamps: list[int] = []

            def broadcasts() -> bool:
                try:
                    stamps.append(log.broadcast("x", "e", 2))
                except replaylog.ReplayLogError:
                    return False
                return True

            wait_for(broadcasts, 30, "a broadcast to the new master")
            gaps: list[replaylog.IncompleteReplayError] = []
            delivered: list[int] = []
            while subscription.position["x"].cursor < stamps[-1]:
                try:
                    message = subscription.get(timeout=20)
                except replaylog.IncompleteReplayError as gap:
                    gaps.append(gap)
                    continue
                assert message is not None, "the subscription did not follow the failover"
                delivered.append(message["timestamp"])
        # Nothing tells the new master what the old one acknowledged last, so the subscriber is
        # told once that messages may be gone, then goes on from where the gap says.
        assert len(gaps) == 1
        assert delivered == [stamp for stamp in stamps if stamp > gaps[0].resume]
        with group.replica.client() as promoted:
            assert promoted.info("replication")["role"] == "master"
            assert promoted.zcard("replay:x") == 2
        assert [m["timestamp"] for m in log.unspool("x", 0)] == [first, *stamps]

        wrong = replaylog.ReplayLog(group.url.replace("sentinel-secret", "wrong"))
        with pytest.raises(replaylog.ReplayLogError, match="(?i)auth|password|pass"):
            wrong.broadcast("x", "e", 1)
    finally:
        group.stop()


def role(server: RedisServer) -> str | None:
    """The server's replication role; None while it is changing (a master turning replica
    closes its clients' connections)."""
    try:
        with server.client() as c:
            return str(c.info("replication")["role"])
    except redis.ConnectionError:
        return None


@pytest.mark.parametrize("how", ["failover", "kill"])
def test_a_failover_mid_stream(group: SentinelGroup, how: str) -> None:
    log = replaylog.ReplayLog(group.url, response_timeout=2, min_replicas=0)
    stream = Stream(log, CHANNELS)
    time.sleep(1)
    old_port = group.master_port()
    started = time.monotonic()
    if how == "failover":
        # A planned failover: the old master lives on as a replica and refuses writes.
        with group.sentinels[0].client() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", group.NAME)
    else:
        group.master.stop()
    wait_for(lambda: group.master_port() != old_port, 30, "the sentinels to promote the replica")
    promoted = time.monotonic() - started
    wait_for(stream.recovered, 30, "a broadcast to succeed again")
    time.sleep(2.5)  # calls re-ask within a second; the hub checks every second
    stream.stop()
    recovery = stream.recovery_seconds(started)
    print(f"\nsentinel {how}: promoted after {promoted:.1f} s, calls recovered in {recovery:.1f} s")
    stream.check()
    new_master = group.replica if group.master_port() == group.replica.port else group.master
    with new_master.client() as master:
        for channel in CHANNELS:
            # Broadcasts after the failover landed on the new master.
            newest = stream.acknowledged[channel][-1]
            assert f'"content":{newest},' in master.zrange(f"replay:{channel}", -1, -1)[0].decode()
            # The subscription followed: it delivered what was broadcast after the failover.
            assert stream.delivered[channel][-1] == newest
