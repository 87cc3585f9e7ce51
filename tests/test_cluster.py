"""A real 6-node Redis Cluster (3 masters, 3 replicas): every operation, and the faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from topology import REDIS_CLI, Cluster, Stream, wait_for

import replaylog

# Channels whose slots fall on every master.
CHANNELS = [f"room-{index}" for index in range(12)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    yield running
    running.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own, for a test that kills or reshards nodes."""
    running = Cluster(tmp_path)
    yield running
    running.stop()


def test_every_operation_on_a_cluster(cluster: Cluster) -> None:
    log = replaylog.ReplayLog(cluster.url)
    assert log.cluster_keys  # a cluster URL implies hash-tagged keys
    with cluster.client() as admin:
        slots_used = {admin.keyslot(f"replay:{{{c}}}") for c in CHANNELS}
        nodes_used = {cluster.master_of(f"replay:{{{c}}}").port for c in CHANNELS}
    assert len(slots_used) == len(CHANNELS) and len(nodes_used) == 3

    firsts = {c: log.broadcast(c, "e", f"first {c}") for c in CHANNELS}
    stamps = log.broadcast_many([(c, "e", n) for n in range(3) for c in CHANNELS])
    assert len(stamps) == 3 * len(CHANNELS)
    every = log.unspool_many({c: firsts[c] for c in CHANNELS})
    assert {c: [m["content"] for m in every[c]] for c in CHANNELS} == {
        c: [0, 1, 2] for c in CHANNELS
    }
    assert [m["content"] for m in log.unspool(CHANNELS[0], 0)] == [f"first {CHANNELS[0]}", 0, 1, 2]
    replayed = log.replay(CHANNELS[1], firsts[CHANNELS[1]])
    assert replayed.complete and [m["content"] for m in replayed.messages] == [0, 1, 2]

    # Idempotency: a retried publish lands once.
    again = [log.broadcast("once", "e", "x", idempotency_key="k") for _ in range(3)]
    assert len(set(again)) == 1 and len(log.unspool("once", 0)) == 1

    # Prune walks every master's keys.
    with cluster.client() as admin:
        for channel in CHANNELS:
            admin.zadd(f"replay:{{{channel}}}", {f'{{"old":"{channel}"}}': 1})
    assert log.prune_replay_logs(60_000) == len(CHANNELS)

    async def async_twins() -> None:
        stamp = await log.abroadcast("async", "e", 1)
        assert [m["timestamp"] for m in await log.aunspool("async", 0)] == [stamp]
        assert (await log.areplay("async", 0)).complete

    asyncio.run(async_twins())


def test_the_command_line_lists_and_prunes_every_masters_logs(cluster: Cluster) -> None:
    """`replaylog stats` and `replaylog prune` walk each master's SCAN in turn: every log once,
    each master's keys over several SCAN steps."""
    log = replaylog.ReplayLog(cluster.url)
    channels = [f"cli-{index}" for index in range(4000)]
    with cluster.client() as admin:
        pipe = admin.pipeline(transaction=False)
        for channel in channels:
            pipe.zadd(f"replay:{{{channel}}}", {f'{{"old":"{channel}"}}': 1})
        pipe.execute()
        assert {cluster.master_of(f"replay:{{{c}}}").port for c in channels[:20]} == {
            node.port for node in cluster.masters()
        }
    log.broadcast(channels[0], "e", "new")
    positions = [log._native.scan_logs(None, "cli-*")[0]]
    while positions[-1] is not None:
        positions.append(log._native.scan_logs(positions[-1], "cli-*")[0])
    # Over 1,000 keys a master (SCAN's COUNT): two steps or more on each.
    assert len({node for node, cursor in positions[:-1] if cursor == 0}) == 2
    assert len(positions) >= 6
    # A master gone since the last step (a failover) ends the walk with an error that says so.
    with pytest.raises(replaylog.ReplayLogError, match="no longer serves slots"):
        log._native.scan_logs(("127.0.0.1:1", 5), "cli-*")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("replaylog")), "--url", cluster.url, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    stats = cli("stats", "cli-*", "--json")
    assert stats.returncode == 0, stats.stderr
    rows = [json.loads(line) for line in stats.stdout.splitlines()]
    assert sorted(row["channel"] for row in rows) == sorted(channels)
    assert next(row for row in rows if row["channel"] == channels[0])["messages"] == 2

    dry = cli("prune", "--dry-run", "--pattern", "cli-*", "--expire-ms", "60000")
    assert dry.stdout.splitlines()[-1] == (
        f"would remove {len(channels)} entries older than 1.0m from {len(channels)} logs"
    ), dry.stderr
    pruned = cli("prune", "--pattern", "cli-*", "--expire-ms", "60000")
    assert pruned.stdout.splitlines()[-1].startswith(f"removed {len(channels)} entries"), pruned
    assert [m["content"] for m in log.unspool(channels[0], 0)] == ["new"]
    with cluster.client() as admin:
        assert sum(admin.zcard(f"replay:{{{c}}}") for c in channels) == 1


def test_subscriptions_on_a_cluster(cluster: Cluster) -> None:
    log = replaylog.ReplayLog(cluster.url)
    with log.subscribe(CHANNELS) as sub:
        sent = [log.broadcast(c, "e", c) for c in CHANNELS]
        got = [sub.get(timeout=10) for _ in CHANNELS]
    assert sorted(m["timestamp"] for m in got if m) == sorted(sent)

    async def main() -> None:
        async with log.asubscribe(CHANNELS[:3]) as sub:
            stamp = await log.abroadcast(CHANNELS[2], "e", "async")
            message = await sub.get(timeout=10)
            assert message is not None and message["timestamp"] == stamp

    asyncio.run(main())


def test_sharded_pubsub_publishes_on_the_channels_shard_only(cluster: Cluster) -> None:
    log = replaylog.ReplayLog(cluster.url, sharded_pubsub=True)
    with log.subscribe(CHANNELS) as sub:
        owner = cluster.master_of(f"replay:{{{CHANNELS[0]}}}")
        with owner.client() as node:
            # SSUBSCRIBE went to the node of the channel's slot.
            assert node.execute_command("PUBSUB", "SHARDNUMSUB", f"mq:{{{CHANNELS[0]}}}")[1] == 1
        sent = [log.broadcast(c, "e", c) for c in CHANNELS]
        got = [sub.get(timeout=10) for _ in CHANNELS]
        assert sorted(m["timestamp"] for m in got if m) == sorted(sent)
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog("redis://localhost:6379/0", sharded_pubsub=True)
    with pytest.raises(replaylog.ConfigurationError):
        replaylog.ReplayLog(cluster.url, cluster_keys=False)


@pytest.mark.parametrize(
    ("min_replicas", "sharded"),
    [(0, False), (1, False), (0, True)],
    ids=["", "min_replicas", "sharded"],
)
def test_a_master_killed_mid_stream(
    fresh_cluster: Cluster, min_replicas: int, sharded: bool
) -> None:
    log = replaylog.ReplayLog(
        fresh_cluster.url,
        min_replicas=min_replicas,
        replica_timeout=0.5,
        response_timeout=2,
        sharded_pubsub=sharded,
    )
    stream = Stream(log, CHANNELS[:6])
    time.sleep(1)
    victim = fresh_cluster.master_of(f"replay:{{{CHANNELS[0]}}}")
    killed_at = time.monotonic()
    with victim.client() as c, contextlib.suppress(redis.ConnectionError):
        c.shutdown(nosave=True)
    victim.proc.wait(timeout=10)  # type: ignore[union-attr]
    victim.proc = None
    wait_for(fresh_cluster.healthy, 30, "the replica's promotion")
    wait_for(stream.recovered, 30, "a broadcast to succeed again")
    time.sleep(1)
    stream.stop()
    recovery = stream.recovery_seconds(killed_at)
    print(f"\nmaster killed ({min_replicas=}, {sharded=}): calls recovered in {recovery:.1f} s")
    stream.check()
    assert all(stream.acknowledged[c] for c in CHANNELS[:6])
    assert stream.failed, "the kill did not interrupt a single broadcast"
    if min_replicas:
        # Every acknowledged message was on a replica: the promotion lost none.
        for channel in CHANNELS[:6]:
            stored = [m["content"] for m in log.unspool(channel, 0)]
            # (A subscriber may still be told to reload: a failover breaks the log's vouching
            # for older cursors, since without the replica's word nothing says what was lost.)
            assert set(stream.acknowledged[channel]) <= set(stored)


def test_the_node_holding_the_subscription_dies(fresh_cluster: Cluster) -> None:
    log = replaylog.ReplayLog(fresh_cluster.url, response_timeout=2)
    stream = Stream(log, CHANNELS[:3])
    time.sleep(1)
    # Classic SUBSCRIBE lives on one node of the cluster's choosing: kill that one.
    holder = None
    for node in fresh_cluster.nodes:
        with node.client() as c:
            if c.execute_command("PUBSUB", "NUMSUB", f"mq:{CHANNELS[0]}")[1]:
                holder = node
    assert holder is not None
    role = holder.client().info("replication")["role"]
    killed_at = time.monotonic()
    holder.stop()
    holder.proc = None
    wait_for(fresh_cluster.healthy, 30, "the cluster to recover")
    wait_for(stream.recovered, 30, "a broadcast to succeed again")
    time.sleep(1)
    stream.stop()
    print(f"\nthe subscription's node ({role}) killed; last failures: {stream.failed[-2:]}")
    recovery = stream.recovery_seconds(killed_at)
    print(f"calls recovered in {recovery:.1f} s")
    stream.check()
    for channel in CHANNELS[:3]:
        # Subscribed again elsewhere: the last messages were delivered.
        assert stream.delivered[channel][-1] == stream.acknowledged[channel][-1]


@pytest.mark.parametrize("sharded", [False, True], ids=["", "sharded"])
def test_resharding_mid_stream(fresh_cluster: Cluster, sharded: bool) -> None:
    log = replaylog.ReplayLog(fresh_cluster.url, sharded_pubsub=sharded)
    stream = Stream(log, CHANNELS[:6])
    time.sleep(0.5)
    source = fresh_cluster.master_of(f"replay:{{{CHANNELS[0]}}}")
    target = next(m for m in fresh_cluster.masters() if m.port != source.port)
    started = time.monotonic()
    subprocess.run(
        [
            REDIS_CLI,
            "--cluster",
            "reshard",
            f"127.0.0.1:{source.port}",
            "--cluster-from",
            fresh_cluster.node_id(source),
            "--cluster-to",
            fresh_cluster.node_id(target),
            "--cluster-slots",
            "5461",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(
        f"\nresharded 5461 slots in {time.monotonic() - started:.1f} s while streaming ({sharded=})"
    )
    time.sleep(0.5)
    stream.stop()
    assert fresh_cluster.master_of(f"replay:{{{CHANNELS[0]}}}").port == target.port
    stream.check()
    # Nothing lost and nothing reported lost: MOVED and ASK were followed.
    assert not stream.failed
    for channel in CHANNELS[:6]:
        assert stream.gaps[channel] == 0
        assert stream.delivered[channel] == stream.acknowledged[channel]
        assert [m["content"] for m in log.unspool(channel, 0)] == stream.acknowledged[channel]


def test_a_planned_failover_mid_stream(fresh_cluster: Cluster) -> None:
    """CLUSTER FAILOVER: the old master turns replica under the stream (MOVED, READONLY)."""
    log = replaylog.ReplayLog(fresh_cluster.url, sharded_pubsub=True)
    stream = Stream(log, CHANNELS[:6])
    time.sleep(0.5)
    old = fresh_cluster.master_of(f"replay:{{{CHANNELS[0]}}}")
    replica = next(
        node
        for node in fresh_cluster.nodes
        if node.client().info("replication").get("master_port") == old.port
    )
    started = time.monotonic()
    with replica.client() as c:
        c.execute_command("CLUSTER", "FAILOVER")
    wait_for(
        lambda: fresh_cluster.master_of(f"replay:{{{CHANNELS[0]}}}").port == replica.port,
        30,
        "the replica to take over",
    )
    print(f"\nplanned failover done in {time.monotonic() - started:.1f} s while streaming")
    time.sleep(1.5)
    stream.stop()
    stream.check()
    for channel in CHANNELS[:6]:
        assert stream.delivered[channel][-1] == stream.acknowledged[channel][-1]
        stored = [m["content"] for m in log.unspool(channel, 0)]
        assert set(stream.acknowledged[channel]) <= set(stored)


def test_a_prune_across_a_failover_removes_each_old_entry_once(fresh_cluster: Cluster) -> None:
    log = replaylog.ReplayLog(fresh_cluster.url)
    old_entries = 0
    with fresh_cluster.client() as admin:
        pipe = admin.pipeline(transaction=False)
        for index in range(3000):
            pipe.zadd(f"replay:{{p{index}}}", {f'{{"n":{index},"a":1}}': 1, f'{{"n":{index}}}': 2})
            old_entries += 2
        pipe.execute()
    old = fresh_cluster.masters()[0]
    replica = next(
        node
        for node in fresh_cluster.nodes
        if node.client().info("replication").get("master_port") == old.port
    )
    outcome: list[object] = []

    def prune() -> None:
        try:
            outcome.append(log.prune_replay_logs(60_000))
        except replaylog.ReplayLogError as error:
            outcome.append(error)

    pruning = threading.Thread(target=prune)
    with replica.client() as c:
        c.execute_command("CLUSTER", "FAILOVER")
        pruning.start()
    pruning.join(timeout=60)
    wait_for(fresh_cluster.healthy, 30, "the failover")
    # The walk of a node that turned replica under it was done again on the new master, and
    # nothing was counted twice.
    assert outcome == [old_entries]
    with fresh_cluster.client() as admin:
        assert sum(admin.zcard(f"replay:{{p{i}}}") for i in range(0, 3000, 97)) == 0


def test_refusals_and_a_slow_node_on_a_cluster(cluster: Cluster) -> None:
    log = replaylog.ReplayLog(cluster.url, response_timeout=1)
    channel = CHANNELS[3]
    owner = cluster.master_of(f"replay:{{{channel}}}")
    other = next(c for c in CHANNELS if cluster.master_of(f"replay:{{{c}}}").port != owner.port)
    with owner.client() as node:
        node.config_set("maxmemory", "1")
        try:
            with pytest.raises(replaylog.OutOfMemoryError):
                log.broadcast(channel, "e", "refused")
            # Other masters are not affected.
            log.broadcast(other, "e", "fine")
        finally:
            node.config_set("maxmemory", "0")
        assert log.unspool(channel, 0) == [] or all(
            m["content"] != "refused" for m in log.unspool(channel, 0)
        )
        # A slow node times out its own calls only.
        node.execute_command("DEBUG", "SLEEP", "0")
    slow = threading_sleep(owner, 2.5)
    try:
        with pytest.raises(replaylog.TimeoutError):
            log.unspool(channel, 0)
        log.broadcast(other, "e", "still fine")
    finally:
        slow.join()
    # NOPERM: an ACL user without EVALSHA on every node.
    for node_server in cluster.nodes:
        with node_server.client() as node:
            node.execute_command(
                "ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+cluster"
            )
    limited = replaylog.ReplayLog(cluster.url.replace("://", "://reader:pw@", 1))
    with pytest.raises(replaylog.PermissionDeniedError):
        limited.broadcast(channel, "e", "no")


def threading_sleep(server, seconds: float):  # type: ignore[no-untyped-def]
    import threading

    def sleep() -> None:
        with server.client(socket_timeout=seconds + 5) as node:
            node.execute_command("DEBUG", "SLEEP", str(seconds))

    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(0.2)
    return thread
