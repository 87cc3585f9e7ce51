"""``rediss://``: a TLS redis-server with a self-signed certificate (``#insecure``), and a plain
``redis://`` URL to the TLS port failing within the connect timeout."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisServer, free_port
from topology import REDIS_CLI, cluster_ports, wait_for

import replaylog

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


class TlsRedis(RedisServer):
    """A dedicated redis-server that speaks only TLS on its port, with a self-signed cert."""

    def __init__(
        self, workdir: Path, *extra: str, port: int | None = None, sharing: TlsRedis | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        if sharing is not None:  # one certificate for a cluster, whose nodes check each other's
            self.cert, self.key = sharing.cert, sharing.key
            super().__init__(workdir, port=port)
            return
        self.cert = workdir / "cert.pem"
        self.key = workdir / "key.pem"
        subprocess.run(
            [
                OPENSSL,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        super().__init__(workdir, port=port)

    def start(self) -> None:
        # Later options win: the plain port is turned off and ours serves TLS.
        self.args = [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.cert),
            "--tls-key-file",
            str(self.key),
            "--tls-ca-cert-file",
            str(self.cert),
            "--tls-auth-clients",
            "no",
            *self.extra,
        ]
        super().start()

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_connect_timeout", 1)
        kwargs.setdefault("socket_timeout", 2)
        return redis.Redis(
            host="localhost", port=self.port, ssl=True, ssl_cert_reqs="none", **kwargs
        )


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "tls")
    yield server
    server.stop()


def test_rediss_broadcasts_unspools_and_replays(tls_redis: TlsRedis) -> None:
    log = replaylog.ReplayLog(
        f"rediss://localhost:{tls_redis.port}/0#insecure",
        connect_timeout=2,
        response_timeout=2,
    )
    try:
        stamps = [log.broadcast("secure", "e", {"i": i}) for i in range(3)]
        assert [m["content"] for m in log.unspool("secure", 0)] == [{"i": i} for i in range(3)]
        r = log.replay("secure", stamps[0])
        assert r.complete is True
        assert [m["timestamp"] for m in r.messages] == stamps[1:]
        assert asyncio.run(log.aunspool("secure", stamps[1]))[0]["timestamp"] == stamps[2]
        with log.subscribe("secure", since=stamps[1]) as sub:
            assert sub.get(timeout=5)["timestamp"] == stamps[2]
            ts = log.broadcast("secure", "e", {"i": 3})
            assert sub.get(timeout=5)["timestamp"] == ts
    finally:
        log.close()
    # It really went over TLS, to this server.
    with tls_redis.client() as c:
        assert c.zcard("replay:secure") == 4


def test_plain_redis_url_to_the_tls_port_fails_within_the_timeout(tls_redis: TlsRedis) -> None:
    log = replaylog.ReplayLog(
        f"redis://localhost:{tls_redis.port}/0", connect_timeout=0.5, response_timeout=0.5
    )
    try:
        started = time.monotonic()
        with pytest.raises(replaylog.ConnectionError):  # TimeoutError subclasses it
            log.broadcast("plain", "e", 1)
        # Bounded by the timeouts (0.5 + 0.5 s), with generous slack: it must not hang.
        assert time.monotonic() - started < 3.0
        with pytest.raises(replaylog.ConnectionError):
            log.unspool("plain", 0)
    finally:
        log.close()
    with tls_redis.client() as c:
        assert c.exists("replay:plain") == 0


def test_rediss_cluster_urls_reach_a_tls_cluster(tmp_path: Path) -> None:
    cluster = ["--cluster-enabled", "yes", "--tls-cluster", "yes"]
    ports = cluster_ports(3)
    first = TlsRedis(tmp_path / "n0", *cluster, port=ports[0])
    nodes = [first] + [
        TlsRedis(tmp_path / f"n{i}", *cluster, port=ports[i], sharing=first) for i in (1, 2)
    ]
    try:
        subprocess.run(
            [REDIS_CLI, "--tls", "--insecure", "--cluster", "create"]
            + [f"127.0.0.1:{node.port}" for node in nodes]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def ready() -> bool:
            for node in nodes:
                with node.client() as c:
                    if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                        return False
            return True

        wait_for(ready, 30, "the TLS cluster")
        url = f"rediss+cluster://127.0.0.1:{first.port}?addr=127.0.0.1:{nodes[1].port}#insecure"
        log = replaylog.ReplayLog(url)
        channels = [f"room-{i}" for i in range(12)]
        with log.subscribe(channels[:1]) as sub:
            stamps = {c: log.broadcast(c, "e", c) for c in channels}
            assert sub.get(timeout=10)["timestamp"] == stamps[channels[0]]
        assert {
            c: [m["content"] for m in ms]
            for c, ms in log.unspool_many({c: 0 for c in channels}).items()
        } == {c: [c] for c in channels}
        # Over TLS to every master: each holds some of the logs.
        for node in nodes:
            with node.client() as c:
                assert c.dbsize() > 0
    finally:
        for node in nodes:
            node.stop()


def test_rediss_sentinel_urls_reach_a_tls_sentinel_group(tmp_path: Path) -> None:
    """A master and a replica that speak only TLS, a sentinel that answers on TLS (its plain
    port is the test's own): calls find the master over TLS, and follow a failover."""
    master = TlsRedis(tmp_path / "master", "--tls-replication", "yes")
    replica = TlsRedis(
        tmp_path / "replica",
        "--tls-replication",
        "yes",
        "--replicaof",
        "127.0.0.1",
        str(master.port),
        sharing=master,
    )
    servers: list[RedisServer] = [master, replica]
    try:
        wait_for(
            lambda: replication(replica, "master_link_status") == "up",
            20,
            "the replica to sync over TLS",
        )
        tls_port = free_port()
        conf = tmp_path / "sentinel" / "sentinel.conf"
        conf.parent.mkdir()
        conf.write_text(
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
            f"tls-port {tls_port}\n"
            f"tls-cert-file {master.cert}\n"
            f"tls-key-file {master.key}\n"
            f"tls-ca-cert-file {master.cert}\n"
            "tls-auth-clients no\n"
            # The sentinel reaches the nodes over TLS too.
            "tls-replication yes\n"
        )
        sentinel = RedisServer(conf.parent, str(conf), "--sentinel", config_first=True)
        servers.append(sentinel)
        log = replaylog.ReplayLog(
            f"rediss+sentinel://127.0.0.1:{tls_port}/0?sentinel_master_name=mymaster#insecure"
        )
        first = log.broadcast("x", "e", 1)
        with master.client() as c:
            assert c.zcard("replay:x") == 1

        def failed_over() -> bool:
            with sentinel.client() as c:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", "mymaster")
                except redis.ResponseError:  # the sentinel has not seen the replica yet
                    return False
                return True

        wait_for(failed_over, 20, "the sentinel to take a failover")

        def switched() -> bool:
            with sentinel.client() as c:
                _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            return int(port) == replica.port and replication(master, "role") == "slave"

        # Until the old master is a replica, a write may still land there, and be lost.
        wait_for(switched, 30, "the sentinel to switch masters and demote the old one")

        def broadcast() -> bool:
            try:
                log.broadcast("x", "e", 2)
            except replaylog.ReplayLogError:
                return False
            return True

        wait_for(broadcast, 30, "a broadcast to the promoted replica")
        with replica.client() as c:
            assert c.zcard("replay:x") >= 2
        assert log.unspool("x", 0)[0]["timestamp"] == first
    finally:
        for server in servers:
            server.stop()


def replication(server: TlsRedis, field: str) -> Any:
    """A field of the server's INFO replication; None while its role changes (a master
    turning replica closes its clients' connections)."""
    try:
        with server.client() as c:
            return c.info("replication").get(field)
    except redis.ConnectionError:
        return None
