"""Real Redis Clusters and Sentinel groups on loopback, for the tests that need one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis
from conftest import RedisServer, free_port

import replaylog

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 2000


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cluster_ports(count: int) -> list[int]:
    """Free ports for `count` cluster nodes, each leaving room for its bus port 10,000 above,
    and none of them another's bus port."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        taken = {p for chosen in ports for p in (chosen, chosen + 10_000)}
        if port <= 55_535 and not {port, port + 10_000} & taken and port_is_free(port + 10_000):
            ports.append(port)
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """Three masters and three replicas; `cluster-node-timeout` 2 s, so a failover takes ~5 s."""

    def __init__(self, workdir: Path, *args: str) -> None:
        ports = cluster_ports(6)
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
                port=ports[index],
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
        wait_for(self.replicas_in_sync, 30, "the replicas to sync")

    def replicas_in_sync(self) -> bool:
        for node in self.nodes:
            if node.proc is None:
                continue
            with node.client(socket_timeout=2) as c:
                replication = c.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
            if replication["role"] == "master" and replication["connected_slaves"] < 1:
                return False
        return True

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

    def __init__(
        self, workdir: Path, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        """With `password`, the master and replica require it (and the sentinels log in with
        it); with `sentinel_password`, so do the sentinels themselves."""
        self.password = password
        self.sentinel_password = sentinel_password
        login = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = RedisServer(
            workdir / "master", "--enable-debug-command", "local", *login, password=password
        )
        self.replica = RedisServer(
            workdir / "replica",
            "--replicaof",
            "127.0.0.1",
            str(self.master.port),
            *login,
            password=password,
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
                + (f"sentinel auth-pass {self.NAME} {password}\n" if password else "")
                # The sentinels log in to each other with their own requirepass.
                + (f"requirepass {sentinel_password}\n" if sentinel_password else "")
            )
            self.sentinels.append(
                RedisServer(
                    conf.parent,
                    str(conf),
                    "--sentinel",
                    config_first=True,
                    password=sentinel_password,
                )
            )
        wait_for(self._sentinels_agree, 20, "the sentinels to see the replica and each other")

    def _replica_in_sync(self) -> bool:
        with self.replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    def _ask(self, sentinel: RedisServer, *command: str) -> list[str]:
        """A sentinel's answer as redis-cli prints it, one item a line (redis-py's parser for
        SENTINEL MASTER breaks on some of its versions)."""
        login = (
            ["--no-auth-warning", "-a", self.sentinel_password] if self.sentinel_password else []
        )
        answer = subprocess.run(
            [REDIS_CLI, "-p", str(sentinel.port), *login, "SENTINEL", *command],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return answer.stdout.splitlines()

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            lines = self._ask(sentinel, "MASTER", self.NAME)
            master = dict(zip(lines[::2], lines[1::2]))
            if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                return False
        return True

    @property
    def url(self) -> str:
        first, *others = self.sentinels
        extra = "".join(f"&addr=127.0.0.1:{s.port}" for s in others)
        if self.sentinel_password:
            extra += f"&sentinel_password={self.sentinel_password}"
        login = f":{self.password}@" if self.password else ""
        return (
            f"redis+sentinel://{login}127.0.0.1:{first.port}/0"
            f"?sentinel_master_name={self.NAME}{extra}"
        )

    def master_port(self) -> int:
        _, port = self._ask(self.sentinels[0], "GET-MASTER-ADDR-BY-NAME", self.NAME)
        return int(port)

    def stop(self) -> None:
        for server in [*self.sentinels, self.master, self.replica]:
            server.stop()


class Stream:
    """Broadcasts a numbered stream to `channels` from a thread while a subscription reads it.

    Afterwards `check()` holds that, per channel, every acknowledged message was delivered
    once and in order, unless the subscription reported the loss (IncompleteReplayError).
    """

    def __init__(self, log: replaylog.ReplayLog, channels: list[str], pause: float = 0.005):
        self.log = log
        self.channels = channels
        self.pause = pause
        self.acknowledged: dict[str, list[int]] = {c: [] for c in channels}
        #: The timestamp of each channel's last acknowledged broadcast.
        self.last_timestamp: dict[str, int] = {}
        self.failed: list[BaseException] = []
        self.unexpected: list[BaseException] = []
        #: When each broadcast failed or came back, and on which channel, to measure recovery.
        self.outcomes: list[tuple[float, bool, str]] = []
        self.delivered: dict[str, list[int]] = {c: [] for c in channels}
        self.gaps: dict[str, int] = {c: 0 for c in channels}
        self.stopped = threading.Event()
        self.subscription = log.subscribe(channels)
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reading = threading.Event()
        self.reading.set()
        self.writer.start()
        self.reader.start()

    def _write(self) -> None:
        number = 0
        while not self.stopped.is_set():
            number += 1
            for channel in self.channels:
                try:
                    timestamp = self.log.broadcast(channel, "n", number)
                except replaylog.ReplicationError as error:
                    # Stored on the master, not on enough replicas: Redis took it, but it is
                    # not acknowledged as durable.
                    self.failed.append(error)
                    self.outcomes.append((time.monotonic(), True, channel))
                except replaylog.ReplayLogError as error:
                    self.failed.append(error)
                    self.outcomes.append((time.monotonic(), False, channel))
                except Exception as error:  # noqa: BLE001 - a bug: recorded, reported by check()
                    self.unexpected.append(error)
                    return
                else:
                    self.acknowledged[channel].append(number)
                    self.last_timestamp[channel] = timestamp
                    self.outcomes.append((time.monotonic(), True, channel))
            time.sleep(self.pause)

    def _read(self) -> None:
        while self.reading.is_set():
            try:
                message = self.subscription.get(timeout=0.2)
            except replaylog.IncompleteReplayError as gap:
                self.gaps[gap.channel] += 1
                continue
            except replaylog.ReplayLogError:
                time.sleep(0.05)  # Redis unreachable for now: the subscription recovers
                continue
            if message is not None:
                self.delivered[message["channel"]].append(message["content"])

    def _recovered_at(self, channel: str, since: float) -> float | None:
        """When a broadcast to `channel` first succeeded after its last failure."""
        outcomes = [(at, ok) for at, ok, c in list(self.outcomes) if c == channel and at >= since]
        last_failure = max((at for at, ok in outcomes if not ok), default=since)
        return min((at for at, ok in outcomes if ok and at > last_failure), default=None)

    def recovered(self) -> bool:
        """Whether broadcasts to every channel succeed again after their last failure."""
        return all(self._recovered_at(c, 0.0) is not None for c in self.channels)

    def recovery_seconds(self, since: float) -> float:
        """From `since` until broadcasts to every channel succeeded again (a channel that failed
        once more later counts from its last failure, if it recovered from that one too)."""
        assert not self.unexpected, self.unexpected
        recovered = [self._recovered_at(c, since) for c in self.channels]
        latest = max((at for at in recovered if at is not None), default=since)
        return latest - since

    def stop(self, drain_timeout: float = 30) -> None:
        self.stopped.set()
        self.writer.join(timeout=60)
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and not self._drained():
            time.sleep(0.05)
        self.reading.clear()
        self.reader.join(timeout=10)
        self.subscription.close()

    def _drained(self) -> bool:
        """Whether the subscription has gone past every acknowledged broadcast: delivered it,
        or reported a gap and gone on from after it."""
        position = self.subscription.position
        return all((position[c].cursor or 0) >= last for c, last in self.last_timestamp.items())

    def check(self) -> None:
        assert not self.unexpected, self.unexpected
        for channel in self.channels:
            delivered = self.delivered[channel]
            # Once and in order: strictly increasing.
            assert delivered == sorted(set(delivered)), f"{channel}: duplicated or reordered"
            missing = set(self.acknowledged[channel]) - set(delivered)
            stored = {m["content"] for m in self.log.unspool(channel, 0)}
            assert not missing or self.gaps[channel], (
                f"{channel}: {len(missing)} acknowledged messages lost without a report"
                f" ({len(missing - stored)} of them not in the log)"
            )
