"""Real Redis Clusters and Sentinel groups on loopback, for the tests that need one."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from conftest import RedisServer, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 2000


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port that leaves room for its cluster bus port, 10,000 above."""
    while True:
        port = free_port()
        if port <= 55535:
            return port


class Cluster:
    """Three masters and three replicas; `cluster-node-timeout` 2 s, so a failover takes ~5 s."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node{index}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--enable-debug-command",
                "local",
                *args,
                port=cluster_port(),
            )
            for index in range(6)
        ]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *[f"127.0.0.1:{node.port}" for node in self.nodes],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_for(self.healthy, 30, "the cluster to be ready")

    @property
    def url(self) -> str:
        first, second = self.nodes[0], self.nodes[1]
        return f"redis+cluster://127.0.0.1:{first.port}?addr=127.0.0.1:{second.port}"

    def client(self) -> redis.RedisCluster:
        alive = next(node for node in self.nodes if node.proc is not None)
        return redis.RedisCluster(host="127.0.0.1", port=alive.port, socket_timeout=5)

    def healthy(self) -> bool:
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                with node.client(socket_timeout=2) as c:
                    info = c.execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def master_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot now."""
        with self.client() as c:
            node = c.get_node_from_key(key)
            return next(n for n in self.nodes if n.port == node.port)

    def node_id(self, server: RedisServer) -> str:
        with server.client() as c:
            return c.execute_command("CLUSTER", "MYID").decode()

    def masters(self) -> list[RedisServer]:
        found = []
        for node in self.nodes:
            if node.proc is None:
                continue
            with node.client() as c:
                role = c.execute_command("ROLE")[0]
            if role in (b"master", "master"):
                found.append(node)
        return found

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """One master, one replica and three sentinels watching them as `mymaster`."""

    NAME = "mymaster"

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master", "--enable-debug-command", "local")
        self.replica = RedisServer(
            workdir / "replica", "--replicaof", "127.0.0.1", str(self.master.port)
        )
        wait_for(self._replica_in_sync, 20, "the replica to sync")
        self.sentinels = []
        for index in range(3):
            conf = workdir / f"sentinel{index}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                f"sentinel failover-timeout {self.NAME} 5000\n"
                f"sentinel parallel-syncs {self.NAME} 1\n"
            )
            self.sentinels.append(
                RedisServer(conf.parent, str(conf), "--sentinel", config_first=True)
            )
        wait_for(self._sentinels_agree, 20, "the sentinels to see the replica and each other")

    def _replica_in_sync(self) -> bool:
        with self.replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as c:
                master = c.sentinel_master(self.NAME)
            if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                return False
        return True

    @property
    def url(self) -> str:
        first, *others = self.sentinels
        extra = "".join(f"&addr=127.0.0.1:{s.port}" for s in others)
        return (
            f"redis+sentinel://127.0.0.1:{first.port}/0"
            f"?sentinel_master_name={self.NAME}{extra}"
        )

    def master_port(self) -> int:
        with self.sentinels[0].client() as c:
            _, port = c.sentinel_get_master_addr_by_name(self.NAME)
        return int(port)

    def stop(self) -> None:
        for server in [*self.sentinels, self.master, self.replica]:
            server.stop()
