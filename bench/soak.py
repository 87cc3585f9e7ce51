"""A bounded soak run: many messages over many channels, with unspool, subscribe and prune
running at the same time; on one redis-server and on a 3-master Redis Cluster.

    .venv/bin/python -m bench.soak [--messages 1000000] [--channels 1000] [--only single|cluster]

Four writer threads broadcast numbered messages (broadcast_many, 50 per call) over the
channels; four subscriptions of a quarter of the channels each read every message; a thread
unspools random channels from random cursors; another prunes every second. At the end every
acknowledged message must have been delivered exactly once (lost 0, duplicates 0). It prints
the client's RSS over time (it must level off), Redis's memory and the throughput. Not part of
the test suite (it runs for minutes).
"""

from __future__ import annotations

import argparse
import array
import random
import resource
import threading
import time

import redis

import replaylog
from bench.cluster import LocalCluster
from bench.server import RedisServer

WRITERS = 4
SUBSCRIPTIONS = 4
BATCH = 50


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def redis_memory_mib(ports: list[int]) -> float:
    total = 0
    for port in ports:
        info = redis.Redis(port=port).info("memory")
        if redis.Redis(port=port).info("replication")["role"] == "master":
            total += info["used_memory"]
    return total / 2**20


def soak(name: str, url: str, ports: list[int], messages: int, channel_count: int) -> bool:
    log = replaylog.ReplayLog(url, expire_ms=600_000)
    channels = [f"soak-{index}" for index in range(channel_count)]
    acknowledged = {c: array.array("q") for c in channels}
    delivered = {c: array.array("q") for c in channels}
    gaps = [0]
    errors: list[BaseException] = []
    per_writer = messages // WRITERS
    done_writing = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def write(index: int) -> None:
        rng = random.Random(index)
        sent = 0
        while sent < per_writer:
            batch = [rng.choice(channels) for _ in range(min(BATCH, per_writer - sent))]
            try:
                stamps = log.broadcast_many([(c, "n", {"w": index, "i": sent}) for c in batch])
            except replaylog.ReplayLogError as error:
                errors.append(error)
                continue
            with lock:
                for channel, stamp in zip(batch, stamps):
                    acknowledged[channel].append(stamp)
            sent += len(batch)

    def read(part: list[str]) -> None:
        with log.subscribe(part) as subscription:
            ready.release()
            while not stop.is_set():
                try:
                    message = subscription.get(timeout=0.2)
                except replaylog.IncompleteReplayError:
                    gaps[0] += 1
                    continue
                if message is not None:
                    delivered[message["channel"]].append(message["timestamp"])

    def unspool() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            channel = rng.choice(channels)
            log.unspool(channel, int(time.time() * 1000) - rng.randint(0, 5000))

    def prune() -> None:
        while not stop.wait(1.0):
            log.prune_replay_logs()

    ready = threading.Semaphore(0)
    quarter = (channel_count + SUBSCRIPTIONS - 1) // SUBSCRIPTIONS
    readers = [
        threading.Thread(target=read, args=(channels[i * quarter : (i + 1) * quarter],))
        for i in range(SUBSCRIPTIONS)
    ]
    for reader in readers:
        reader.start()
    for _ in readers:
        ready.acquire()
    helpers = [threading.Thread(target=unspool), threading.Thread(target=prune)]
    for helper in helpers:
        helper.start()
    started = time.monotonic()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    samples = []

    def sample() -> None:
        # The soak's own record of every timestamp sent and received is part of the RSS.
        records = sum(len(a) for a in acknowledged.values()) + sum(
            len(a) for a in delivered.values()
        )
        samples.append((time.monotonic() - started, rss_mib(), records * 8 / 2**20))

    while any(writer.is_alive() for writer in writers):
        sample()
        time.sleep(max(1.0, samples[-1][0] / 10))
    elapsed = time.monotonic() - started
    done_writing.set()
    total = sum(len(v) for v in acknowledged.values())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(len(v) for v in delivered.values()) < total:
        time.sleep(0.1)
    stop.set()
    for thread in readers + helpers:
        thread.join()
    lost = duplicates = 0
    for channel in channels:
        sent, got = set(acknowledged[channel]), list(delivered[channel])
        duplicates += len(got) - len(set(got))
        lost += len(sent - set(got))
    sample()
    print(f"{name}: {total:,} messages over {channel_count:,} channels in {elapsed:.1f} s")
    print(f"  throughput        {total / elapsed:,.0f} msg/s (with unspool, subscribe, prune)")
    print(f"  lost              {lost}")
    print(f"  duplicates        {duplicates}")
    print(f"  gaps reported     {gaps[0]}   failed calls {len(errors)}")
    print("  client RSS (MiB)  " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m, _ in samples))
    print(
        "  without records   "
        + ", ".join(f"{t:.0f}s {m - records:.0f}" for t, m, records in samples)
        + "  (RSS less the soak's own 8 bytes per timestamp sent and received)"
    )
    print(f"  Redis memory      {redis_memory_mib(ports):,.0f} MiB on the master(s)")
    return lost == 0 and duplicates == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--only", choices=["single", "cluster"])
    args = parser.parse_args()
    ok = True
    if args.only != "cluster":
        with RedisServer() as server:
            ok &= soak("one server", server.url, [server.port], args.messages, args.channels)
    if args.only != "single":
        with LocalCluster() as cluster:
            ok &= soak("cluster", cluster.url, cluster.ports, args.messages, args.channels)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
