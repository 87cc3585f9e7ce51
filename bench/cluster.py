"""Broadcast throughput with 8 threads: one redis-server against a 3-master Redis Cluster.

    .venv/bin/python -m bench.cluster [--seconds 3] [--rounds 3]

Both run in this process, one after the other, each round, on servers started here; the
cluster has 3 masters and 3 replicas on loopback. It prints messages per second (best round)
and the ratio cluster / one server. On a 2-core VM the six cluster processes and the client
share the same two cores, so this measures the cost of routing, not the gain of more machines.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time

import redis

import replaylog
from bench.server import RedisServer, free_port

THREADS = 8
CHANNELS = [f"room-{index}" for index in range(64)]


class LocalCluster:
    """Six redis-servers (3 masters, 3 replicas) on loopback, in a temporary directory."""

    def __enter__(self) -> LocalCluster:
        self.dir = tempfile.mkdtemp(prefix="replaylog-bench-cluster-")
        self.ports = []
        while len(self.ports) < 6:
            port = free_port()
            # Room for its bus port, 10,000 above, which must not be another node's port.
            taken = {p for chosen in self.ports for p in (chosen, chosen + 10_000)}
            if port <= 55535 and not {port, port + 10_000} & taken:
                self.ports.append(port)
        self.procs = [
            subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf", "--dir", self.dir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for port in self.ports
        ]  # fmt: skip
        for port in self.ports:
            self._wait(lambda port=port: redis.Redis(port=port).ping())
        subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in self.ports]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        self._wait(self._ready)
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"
        return self

    def _ready(self) -> bool:
        for port in self.ports:
            info = redis.Redis(port=port).execute_command("CLUSTER", "INFO")
            if b"cluster_state:ok" not in info:
                return False
        return True

    @staticmethod
    def _wait(condition) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 30
        while True:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("bench.cluster: the cluster did not come up")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def throughput(log: replaylog.ReplayLog, seconds: float) -> tuple[float, float]:
    """Messages per second that 8 threads broadcast for `seconds`, over 64 channels, and the
    client's CPU µs per message."""
    counts = [0] * THREADS
    start = threading.Barrier(THREADS + 1)
    stop = threading.Event()

    def work(index: int) -> None:
        start.wait()
        sent = 0
        while not stop.is_set():
            log.broadcast(CHANNELS[(index * 8 + sent) % len(CHANNELS)], "e", {"n": sent})
            sent += 1
        counts[index] = sent

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    log.broadcast("warm-up", "e", 0)
    start.wait()
    began = time.perf_counter()
    cpu_before = time.process_time()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    sent = sum(counts)
    return sent / (time.perf_counter() - began), (time.process_time() - cpu_before) / sent * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with RedisServer() as server, LocalCluster() as cluster:
        single = replaylog.ReplayLog(server.url)
        clustered = replaylog.ReplayLog(cluster.url)
        sharded = replaylog.ReplayLog(cluster.url, sharded_pubsub=True)
        best = {
            "one server": (0.0, 0.0),
            "cluster": (0.0, 0.0),
            "cluster, sharded pub/sub": (0.0, 0.0),
        }
        for _ in range(args.rounds):
            for name, log in zip(best, (single, clustered, sharded)):
                best[name] = max(best[name], throughput(log, args.seconds))
    base = best["one server"][0]
    print(f"broadcast, {THREADS} threads, {len(CHANNELS)} channels, best of {args.rounds}:")
    for name, (rate, cpu) in best.items():
        print(
            f"  {name:<26} {rate:>9,.0f} msg/s   {rate / base:.2f}x one server"
            f"   client CPU {cpu:.1f} µs/msg"
        )


if __name__ == "__main__":
    main()
