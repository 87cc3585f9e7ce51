"""``rediss://``: a TLS redis-server with a self-signed certificate (``#insecure``), and a plain
``redis://`` URL to the TLS port failing within the connect timeout."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import REDIS_SERVER, free_port

import replaylog

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


class TlsRedis:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
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
        self.port = free_port()
        log_path = workdir / "redis.log"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
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
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TLS redis-server exited: {log_path.read_text()}")
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("TLS redis-server never answered PING")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="localhost",
            port=self.port,
            ssl=True,
            ssl_cert_reqs="none",
            socket_connect_timeout=1,
            socket_timeout=2,
        )

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=15)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path)
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
