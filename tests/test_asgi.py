"""The asyncio API under a real ASGI server: the tiny Django project's async views on uvicorn.

uvicorn runs ``djangoproject.asgi:application`` in a subprocess (Django stays unconfigured in
this process), against the session's test redis-server. Clients are plain threads and sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import django
import redis
from conftest import free_port

import replaylog

HERE = Path(__file__).resolve().parent


def server_env(redis_url: str) -> dict[str, str]:
    """The environment of a server of the tiny project on ``redis_url``: none of the test
    process's own replaylog, Django or pytest settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REPLAYLOG_", "EXPIRE_REPLAY_LOGS_MS", "DJANGO_", "PYTEST_"))
    }
    env["DJANGO_SETTINGS_MODULE"] = "djangoproject.settings"
    env["REPLAYLOG_URL"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return env


class Server:
    """``uvicorn djangoproject.asgi:application`` on a loopback port."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = server_env(redis_url)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "djangoproject.asgi:application",
                "--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "off",
                "--no-access-log", "--log-level", "warning",
            ],
            cwd=HERE, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"uvicorn exited:\n{self.log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"uvicorn never listened:\n{self.log()}"
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, timeout: float = 10
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if form else {}
            conn.request(method, path, body=urlencode(form) if form else None, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


def pubsub_count(rdb: redis.Redis) -> int:
    return len(rdb.client_list(_type="pubsub"))


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)


class EventStream:
    """A GET of the SSE view on a raw socket; a thread reads its events."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = 0
        self.headers: dict[str, str] = {}
        self.subscribed = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.status = int(self.file.readline().split()[1])
            while (line := self.file.readline().strip()) != b"":
                name, _, value = line.decode().partition(":")
                self.headers[name.lower()] = value.strip()
            assert self.headers.get("transfer-encoding") == "chunked", self.headers
            buffer = b""
            while True:
                size = int(self.file.readline().strip(), 16)
                chunk = self.file.read(size + 2)[:size]
                if size == 0:
                    return
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._event(block.decode())
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _event(self, block: str) -> None:
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields[name or "comment"] = json.loads(value) if name == "data" else value
        if fields.get("comment") == "subscribed":
            self.subscribed.set()
        self.events.append(fields)

    def messages(self) -> list[dict[str, Any]]:
        return [event["data"] for event in self.events if "data" in event]

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the stream did not end: {self.events}"
        assert self.error is None, repr(self.error)

    def close(self) -> None:
        # shutdown() sends the FIN and wakes the reader thread; close() alone would do neither
        # while that thread is blocked in recv().
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.file.close()
        self.sock.close()


# --------------------------------------------------------------------------- tests


def test_concurrent_posts_each_get_their_own_timestamp(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    clients = 200
    start = threading.Barrier(clients)

    def post(i: int) -> tuple[int, Any]:
        start.wait(timeout=30)
        return server.request(
            "POST", "/async/rooms/crowd/messages/", {"author": f"c{i}", "text": f"m{i}"}
        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(post, range(clients)))

    assert [status for status, _ in results] == [201] * clients, server.log()
    stamps = [body["timestamp"] for _, body in results]
    assert len(set(stamps)) == clients
    logged = replay_log.unspool("crowd", 0)
    assert [m["timestamp"] for m in logged] == sorted(stamps)
    # Each response's timestamp is the one its own message was stored with.
    assert {m["content"]["text"]: m["timestamp"] for m in logged} == {
        f"m{i}": stamp for i, stamp in enumerate(stamps)
    }
    assert all(m["content"]["author"] == "c" + m["content"]["text"][1:] for m in logged)

    status, body = server.request("GET", f"/async/rooms/crowd/messages/?since={sorted(stamps)[99]}")
    assert status == 200 and body["complete"] is True
    assert body["messages"] == logged[100:]


def test_event_stream_sends_missed_then_live_messages_once_each(
    server: Server, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    cursor = replay_log.broadcast("sse", "chat", {"text": "seen"})
    missed = [replay_log.broadcast("sse", "chat", {"text": f"missed-{i}"}) for i in range(3)]
    path = "/async/rooms/sse/messages/"

    stream = EventStream(server.port, f"/rooms/sse/stream/?since={cursor}&n=10")
    try:
        # Published while the view is subscribing: each must come exactly once, from the replay
        # or live.
        racing = [server.request("POST", path, {"text": f"racing-{i}"})[1] for i in range(3)]
        assert stream.subscribed.wait(10), f"never subscribed: {stream.error!r}\n{server.log()}"
        live = [server.request("POST", path, {"text": f"live-{i}"})[1] for i in range(4)]
        stream.join(timeout=10)
    finally:
        stream.close()

    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    expected = missed + [r["timestamp"] for r in racing + live]
    messages = stream.messages()
    assert [m["timestamp"] for m in messages] == expected
    assert [m["content"]["text"] for m in messages] == [
        *(f"missed-{i}" for i in range(3)),
        *(f"racing-{i}" for i in range(3)),
        *(f"live-{i}" for i in range(4)),
    ]
    assert messages == [{"channel": "sse", **m} for m in replay_log.unspool("sse", cursor)]
    assert stream.events[0] == {"comment": "subscribed"}
    assert [e["id"] for e in stream.events[1:]] == [str(t) for t in expected]
    # The stream ended after n=10 messages and closed its subscription.
    wait_until(lambda: pubsub_count(rdb) == 0, 5, "pubsub connection released")


def test_idle_streams_do_not_block_the_loop_and_are_released_on_disconnect(
    server: Server, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    clients = 100
    streams: list[EventStream] = []
    try:
        for _ in range(clients):
            streams.append(EventStream(server.port, "/rooms/idle/stream/"))
        for stream in streams:
            assert stream.subscribed.wait(15), f"never subscribed: {stream.error!r}\n{server.log()}"
        # All share the worker's one pub/sub connection.
        wait_until(lambda: pubsub_count(rdb) == 1, 10, "the pubsub connection")

        # 100 open subscriptions waiting on Redis: the event loop still serves requests.
        replay_log.broadcast("other", "chat", {"text": "hi"})
        for _ in range(5):
            started = time.monotonic()
            status, body = server.request("GET", "/async/rooms/other/messages/", timeout=10)
            elapsed = time.monotonic() - started
            assert status == 200 and [m["content"] for m in body["messages"]] == [{"text": "hi"}]
            assert elapsed < 2, f"the replay view took {elapsed:.2f}s with {clients} idle streams"

        # The streams are live, not stuck: one message reaches every one of them.
        _, posted = server.request("POST", "/async/rooms/idle/messages/", {"text": "wake"})
        for stream in streams:
            wait_until(lambda s=stream: s.messages(), 10, "the message on every stream")
            assert [m["timestamp"] for m in stream.messages()] == [posted["timestamp"]]
    finally:
        for stream in streams:
            stream.close()

    # The clients hung up: Django (from 5.0 on) cancels each streaming response, which closes
    # the subscription.
    if django.VERSION >= (5, 0):
        wait_until(lambda: pubsub_count(rdb) == 0, 5, "every pubsub connection released")
    status, _ = server.request("GET", "/async/rooms/idle/messages/")
    assert status == 200
