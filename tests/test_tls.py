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
from conftest import RedisServer

import replaylog

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


class TlsRedis(RedisServer):
    """A dedicated redis-server that speaks only TLS on its port, with a self-signed cert."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
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
        super().__init__(workdir)

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
