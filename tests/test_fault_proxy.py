"""Links that are cut, stalled and slowed at random moments, for a bounded run: between the
app and Redis, and between the browser and the SSE server. Every acknowledged message still
reaches the reader once and in order, or the reader is told of the loss."""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import free_port, shut_down
from test_asgi import Server
from test_event_stream import SSE
from topology import Stream

import replaylog

CHAOS_SECONDS = 6.0


class FaultProxy:
    """A TCP proxy to `target_port` whose links can be cut, stalled and slowed."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.pairs.append((client, upstream))
            for source, destination in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, destination), daemon=True).start()

    def _pump(self, source: socket.socket, destination: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
                # A stall holds what was read; a slow link delays each chunk.
                self.flowing.wait()
                if self.delay:
                    time.sleep(self.delay)
                if not data:
                    raise OSError("end of stream")
                destination.sendall(data)
            except OSError:
                shut_down(source, destination)
                return

    def cut(self) -> None:
        """Resets every open link; new ones connect as usual."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            shut_down(*pair)

    def chaos(self, seconds: float, seed: int) -> dict[str, int]:
        """Cuts, stalls (up to 1.5 s) and slows (up to 50 ms a chunk) links at random moments."""
        rng = random.Random(seed)
        done = {"cut": 0, "stall": 0, "slow": 0}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.5))
            fault = rng.choice(list(done))
            done[fault] += 1
            if fault == "cut":
                self.cut()
            elif fault == "stall":
                self.flowing.clear()
                time.sleep(rng.uniform(0.2, 1.5))
                self.flowing.set()
            else:
                self.delay = rng.uniform(0.005, 0.05)
                time.sleep(rng.uniform(0.2, 1.0))
                self.delay = 0.0
        return done

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        self.listener.close()
        self.cut()


@pytest.fixture
def redis_proxy(replaylog_redis_proc) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    proxy = FaultProxy(int(replaylog_redis_proc.port))
    yield proxy
    proxy.close()


def test_faults_between_the_app_and_redis(redis_proxy: FaultProxy, replaylog_url: str) -> None:
    parts = urlsplit(replaylog_url)
    login = parts.netloc.rpartition("@")[0]
    netloc = f"{login}@127.0.0.1:{redis_proxy.port}" if login else f"127.0.0.1:{redis_proxy.port}"
    url = urlunsplit(parts._replace(netloc=netloc))
    log = replaylog.ReplayLog(url, connect_timeout=1, response_timeout=1)
    seed = random.randrange(2**32)
    stream = Stream(log, ["p-a", "p-b", "p-c"], pause=0.01)
    started = time.monotonic()
    faults = redis_proxy.chaos(CHAOS_SECONDS, seed)
    healed = time.monotonic()
    time.sleep(1.5)
    stream.stop()
    print(f"\nseed {seed}: {faults}; calls recovered {stream.recovery_seconds(healed):.2f} s after")
    stream.check()
    assert sum(faults.values()) >= 5
    acknowledged = sum(len(v) for v in stream.acknowledged.values())
    assert acknowledged > 0, f"seed {seed}: nothing got through"
    # The run began and ended healthy: the last broadcasts were delivered live.
    for channel in stream.channels:
        assert stream.delivered[channel][-1] == stream.acknowledged[channel][-1]
    assert time.monotonic() - started < CHAOS_SECONDS + 60


@pytest.fixture
def sse_server(replaylog_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = Server(replaylog_url, tmp_path / "uvicorn.log")
    yield srv
    srv.stop()


def test_faults_between_the_browser_and_the_sse_server(
    sse_server: Server, replay_log: replaylog.ReplayLog
) -> None:
    proxy = FaultProxy(sse_server.port)
    seed = random.randrange(2**32)
    received: list[int] = []
    resets = 0
    stop_reading = threading.Event()
    stop_writing = threading.Event()
    sent: list[int] = []

    def read() -> None:
        """An EventSource: reads frames, and on a lost stream reconnects with Last-Event-ID."""
        nonlocal resets
        last_id: str | None = None
        while not stop_reading.is_set():
            try:
                stream = SSE(proxy.port, "/events/chaos/", last_event_id=last_id)
            except (OSError, ValueError, IndexError):
                time.sleep(0.25)  # EventSource's retry
                continue
            try:
                while not stop_reading.is_set():
                    try:
                        frame = stream.frames.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if frame is None:
                        break
                    if frame.get("event") == "stream-reset":
                        resets += 1
                    if frame.get("id"):
                        last_id = frame["id"]
                    data = frame.get("data")
                    if isinstance(data, dict) and "content" in data:
                        received.append(data["content"])
            finally:
                stream.close()

    def write() -> None:
        number = 0
        while not stop_writing.is_set():
            number += 1
            replay_log.broadcast("chaos", "n", number)
            sent.append(number)
            time.sleep(0.01)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        faults = proxy.chaos(CHAOS_SECONDS, seed)
    finally:
        stop_writing.set()
        writer.join(timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (set(sent) <= set(received) or resets):
        time.sleep(0.05)
    stop_reading.set()
    reader.join(timeout=10)
    proxy.close()
    print(f"\nseed {seed}: {faults}; {len(sent)} sent, {len(received)} received, {resets} resets")
    assert sent
    assert received == sorted(set(received)), f"seed {seed}: duplicated or reordered"
    assert set(sent) <= set(received) or resets, f"seed {seed}: lost without a reset"
