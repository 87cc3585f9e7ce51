"""Shared fixtures and helpers for the core replaylog suite.

The session redis-server, ``replaylog_url`` and ``replay_log`` come from the project's own pytest
plugin (``replaylog.pytest_plugin``, registered through its ``pytest11`` entry point). Fault tests
start dedicated redis-server processes here, so they can be killed, filled, made read-only or
locked down without disturbing the shared one.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import replaylog

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
FAKETIME = shutil.which("faketime") or "/usr/bin/faketime"
SENTINEL_CHANNEL = b"__replaylog_test_sentinel__"
# How long Redis stays down in the restart tests: its clients notice and fail to reconnect.
OUTAGE = 1.0


# --------------------------------------------------------------------------- small helpers


def free_port() -> int:
    """A loopback TCP port nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_now_ms(client: redis.Redis) -> int:
    """The Redis server's clock, in milliseconds."""
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def snapshot(client: redis.Redis) -> dict[bytes, tuple[bytes, Any]]:
    """Every key of the current database with its type and full value."""
    out: dict[bytes, tuple[bytes, Any]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == b"zset":
            value: Any = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"string":
            value = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"stream":
            value = client.xrange(key)
        else:
            value = None
        out[key] = (kind, value)
    return out


def stored_members(client: redis.Redis, key: str | bytes) -> list[tuple[str, int]]:
    """The members of a log zset, oldest first, as (json text, integer score)."""
    return [
        (member.decode("utf-8"), int(score))
        for member, score in client.zrangebyscore(key, "-inf", "+inf", withscores=True)
    ]


def article_broadcast(db: redis.Redis, channel: str, event_name: str, content: Any) -> int:
    """The article's broadcast, verbatim but for redis-py 3+'s ``zadd`` mapping: the app
    server's clock, no bookkeeping, two round trips."""
    timestamp = int(time.time() * 1000)
    flattened = json.dumps({"event_name": event_name, "content": content, "timestamp": timestamp})
    db.publish(f"mq:{channel}", flattened)
    db.zadd(f"replay:{channel}", {flattened: timestamp})
    return timestamp


class PublishWatcher:
    """A redis-py ``PSUBSCRIBE *`` listener that tells exactly what was published so far.

    ``published()`` publishes a unique sentinel and returns every message received before it;
    since Redis runs commands in order, anything published before the call is in the list.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.psubscribe("*")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "psubscribe":
                return
        raise AssertionError("PSUBSCRIBE was never confirmed")

    def published(self) -> list[tuple[bytes, bytes]]:
        token = uuid.uuid4().hex.encode()
        self.client.publish(SENTINEL_CHANNEL, token)
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=1.0)
            if msg is None or msg["type"] != "pmessage":
                continue
            if msg["channel"] == SENTINEL_CHANNEL and msg["data"] == token:
                return out
            out.append((msg["channel"], msg["data"]))
        raise AssertionError("the sentinel message never arrived")

    def close(self) -> None:
        self.pubsub.close()


def run_python(
    code: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    prefix: list[str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (optionally under ``prefix``, e.g. faketime)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    cmd = [*(prefix or []), sys.executable, "-c", code]
    return subprocess.run(
        cmd,
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def last_json_line(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"no output\nstderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def receive(sub: replaylog.Subscription, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Exactly ``count`` messages (fails after ``timeout``), then checks nothing else is ready."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} of {count} messages came: {got[-3:]}"
        message = sub.get(timeout=min(remaining, 1.0))
        if message is not None:
            got.append(message)
    extra = sub.get(timeout=0.3)
    assert extra is None, f"an unexpected extra message: {extra}"
    return got


def drain(sub: replaylog.Subscription, wait: float = 0.5) -> list[dict[str, Any]]:
    """Everything ``sub`` delivers until nothing comes for ``wait`` seconds."""
    got = []
    while True:
        message = sub.get(timeout=wait)
        if message is None:
            return got
        got.append(message)


def contents(messages: list[dict[str, Any]]) -> list[Any]:
    return [m["content"] for m in messages]


# --------------------------------------------------------------------------- dedicated servers


class RedisServer:
    """A redis-server process of our own on a loopback port; restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        password: str | None = None,
        config_first: bool = False,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        # A sentinel's config file must come before every option.
        self.config_first = config_first
        self.host = "127.0.0.1"
        self.args = list(args)
        self.password = password
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        log_path = self.workdir / "redis.log"
        config = self.args[:1] if self.config_first else []
        options = self.args[1:] if self.config_first else self.args
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *config,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(log_path),
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: "
                    + (log_path.read_text() if log_path.exists() else "")
                )
            try:
                with self.client(socket_connect_timeout=0.5, socket_timeout=2) as c:
                    if c.ping():
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} never answered PING")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=15)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("password", self.password)
        return redis.Redis(host=self.host, port=self.port, **kwargs)


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start dedicated redis-servers: ``redis_server_factory(*extra_args, password=None)``."""
    servers: list[RedisServer] = []

    def make(*args: str, password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", *args, password=password)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def dedicated_redis(redis_server_factory: Any) -> RedisServer:
    """One dedicated redis-server for a fault test."""
    return redis_server_factory()


@pytest.fixture
def closed_port() -> int:
    return free_port()


class SilentServer:
    """A TCP server that accepts connections and reads, but never answers: Redis hung."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.got_data = threading.Event()
        self.stopped = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout, OSError):
                continue
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.got_data.set()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A port whose accept queue is full, so new TCP connects hang (SYNs are dropped)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(2):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except (BlockingIOError, OSError):
            pass
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


def shut_down(*sockets: socket.socket) -> None:
    """Ends both directions of each socket, as a reset link would; an already dead one is fine."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class LatencyProxy:
    """A threaded TCP proxy to ``target_port`` that delays every chunk by ``delay`` seconds,
    each way (so a round trip takes at least twice that). An end of stream on either side
    is passed on (after the delay) by closing both sockets of that pair."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = free_port()
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.sockets += [client, upstream]
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, destination: socket.socket) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                chunks.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        def write() -> None:
            while True:
                due, data = chunks.get()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                try:
                    if not data:
                        raise OSError("end of stream")
                    destination.sendall(data)
                except OSError:
                    shut_down(source, destination)
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            shut_down(*self.sockets)
            for sock in self.sockets:
                sock.close()


@pytest.fixture
def latency_proxy(replaylog_redis_proc: Any) -> Iterator[Any]:
    """``latency_proxy(delay)``: a LatencyProxy to the session redis-server, closed afterwards."""
    proxies: list[LatencyProxy] = []

    def make(delay: float) -> LatencyProxy:
        proxies.append(LatencyProxy(int(replaylog_redis_proc.port), delay))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


# --------------------------------------------------------------------------- session server


@pytest.fixture
def rdb(replay_log: replaylog.ReplayLog, replaylog_redis_proc: Any) -> Iterator[redis.Redis]:
    """A redis-py client on the (already flushed) session server the default log uses."""
    client = redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port)
    yield client
    client.close()


@pytest.fixture
def watcher(rdb: redis.Redis) -> Iterator[PublishWatcher]:
    w = PublishWatcher(rdb)
    yield w
    w.close()


@pytest.fixture
def server(replay_log: replaylog.ReplayLog, replaylog_url: str, tmp_path: Path) -> Iterator[Any]:
    """The tests' Django project under uvicorn (test_asgi's ``Server``) on the session server;
    its log must end without a traceback."""
    from test_asgi import Server

    srv = Server(replaylog_url, tmp_path / "uvicorn.log")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture
def clean_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No replaylog settings in the environment, no default log; restored afterwards."""
    for name in (
        "REPLAYLOG_URL",
        "EXPIRE_REPLAY_LOGS_MS",
        "REPLAYLOG_CONNECT_TIMEOUT",
        "REPLAYLOG_RESPONSE_TIMEOUT",
        "REPLAYLOG_CHANNEL_PREFIX",
        "REPLAYLOG_LOG_PREFIX",
    ):
        monkeypatch.delenv(name, raising=False)
    replaylog.reset_default()
    yield monkeypatch
    replaylog.reset_default()


def pytest_report_header() -> str:
    # Which build a run tests: the checkout's (scripts/develop) or an installed wheel's.
    return f"replaylog: {replaylog._native.__file__}"
