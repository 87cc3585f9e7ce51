"""replaylog.django.views.EventStreamView under a real uvicorn, against the test redis-server:
every bullet of the wire format, read off a raw socket as a browser's EventSource reads it."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import django
import pytest
import redis
from conftest import free_port
from test_asgi import HERE, Server, pubsub_count, server_env, wait_until

import replaylog
from replaylog.django.views import decode_position


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class SSE:
    """A GET of an event stream on a raw socket; a thread parses its frames into a queue."""

    def __init__(self, port: int, path: str, last_event_id: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        header = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\n"
        self.sock.sendall(request.encode("latin-1"))
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline().strip()) != b"":
            name, _, value = line.decode().partition(":")
            self.headers[name.lower()] = value.strip()
        self.raw = b""
        self.frames: queue.Queue[dict[str, Any] | None] = queue.Queue()
        if self.status != 200:
            self.raw = self.file.read(int(self.headers.get("content-length", "0")))
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _chunks(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding") == "chunked":  # uvicorn
            while (size := int(self.file.readline().strip(), 16)) != 0:
                yield self.file.read(size + 2)[:size]
        else:  # runserver: the body until the connection closes
            while chunk := self.file.read1(65536):
                yield chunk

    def _read(self) -> None:
        buffer = b""
        try:
            for chunk in self._chunks():
                self.raw += chunk
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self.frames.put(parse_frame(block.decode()))
        except (OSError, ValueError):
            pass
        self.frames.put(None)

    def next(self, timeout: float = 10) -> dict[str, Any]:
        frame = self.frames.get(timeout=timeout)
        assert frame is not None, "the stream ended"
        return frame

    def next_event(self, timeout: float = 10) -> dict[str, Any]:
        """The next frame that is not a keep-alive comment."""
        deadline = time.monotonic() + timeout
        while "data" not in (frame := self.next(max(0.0, deadline - time.monotonic()))):
            pass
        return frame

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def parse_frame(block: str) -> dict[str, Any]:
    """A frame's fields as EventSource reads them: ``comment`` lists the comment lines."""
    fields: dict[str, Any] = {"comment": []}
    for line in block.split("\n"):
        if line.startswith(":"):
            fields["comment"].append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        assert name not in fields, f"field {name!r} twice in {block!r}"
        fields[name] = json.loads(value) if name == "data" else value
    return fields


def opened(stream: SSE) -> dict[str, Any]:
    assert stream.status == 200, stream.raw
    frame = stream.next()
    assert frame["event"] == "stream-open" and "retry" in frame and frame["id"], frame
    return frame


# --------------------------------------------------------------------------- tests


def test_headers_opening_frame_and_live_messages(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    before = replay_log.broadcast("lobby", "chat", {"text": "before"})
    stream = SSE(server.port, "/lobby/events/")
    try:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        opening = opened(stream)
        assert int(opening["retry"]) > 0
        assert opening["data"] == {"channels": ["lobby"]}
        # Without Last-Event-ID the stream starts at "now": the opening id is that position.
        assert decode_position(opening["id"])["lobby"].cursor == before
        stamps = [replay_log.broadcast("lobby", "chat", {"text": f"m{i}"}) for i in range(3)]
        events = [stream.next_event() for _ in stamps]
    finally:
        stream.close()
    assert [e["event"] for e in events] == ["chat"] * 3
    assert [e["data"] for e in events] == [
        {"channel": "lobby", **m} for m in replay_log.unspool("lobby", before)
    ]
    assert set(events[0]["data"]) == {"channel", "event_name", "content", "prev", "timestamp"}
    assert [decode_position(e["id"])["lobby"].cursor for e in events] == stamps


def test_every_id_resumes_exactly_after_it(server: Server, replay_log: replaylog.ReplayLog) -> None:
    stream = SSE(server.port, "/lobby/events/")
    try:
        ids = [opened(stream)["id"]]
        stamps = [replay_log.broadcast("lobby", "chat", i) for i in range(4)]
        ids += [stream.next_event()["id"] for _ in stamps]
    finally:
        stream.close()
    for i, event_id in enumerate(ids):
        # By header, and by query parameter (the first page load, polyfills).
        by_header = SSE(server.port, "/lobby/events/", last_event_id=event_id)
        by_query = SSE(server.port, f"/lobby/events/?lastEventId={quote(event_id)}")
        try:
            for resumed in (by_header, by_query):
                start = decode_position(opened(resumed)["id"])
                assert start["lobby"].cursor == decode_position(event_id)["lobby"].cursor
                got = [resumed.next_event()["data"]["timestamp"] for _ in stamps[i:]]
                assert got == stamps[i:]
                assert resumed.frames.empty()  # nothing more, no reset
        finally:
            by_header.close()
            by_query.close()


def test_reconnecting_while_messages_flow_gets_each_exactly_once_in_order(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    total = 300
    done = threading.Event()

    def broadcast() -> None:
        for i in range(total):
            replay_log.broadcast("lobby", "chat", i)
            if i % 20 == 0:
                time.sleep(0.01)
        done.set()

    received: list[int] = []
    last_id: str | None = None
    publisher = threading.Thread(target=broadcast)
    publisher.start()
    connections = 0
    while not received or received[-1] != total - 1:
        stream = SSE(server.port, "/lobby/events/", last_event_id=last_id)
        connections += 1
        try:
            last_id = opened(stream)["id"]
            # Read a few, then hang up mid-stream.
            for _ in range(25):
                if received and received[-1] == total - 1:
                    break
                event = stream.next_event(timeout=30)
                assert event["event"] == "chat", event
                received.append(event["data"]["content"])
                last_id = event["id"]
        finally:
            stream.close()
        assert connections < 200
    publisher.join()
    assert done.is_set()
    # The first connection started from "now": whatever came before it is not expected.
    first = received[0]
    assert received == list(range(first, total))
    assert connections > 5


def test_a_client_that_drops_before_any_message_resumes_without_loss(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    stream = SSE(server.port, "/events/a+b/")
    try:
        opening = opened(stream)
    finally:
        stream.close()
    assert set(decode_position(opening["id"])) == {"a", "b"}
    missed = [replay_log.broadcast(c, "chat", c) for c in ("a", "b", "a")]
    stream = SSE(server.port, "/events/a+b/", last_event_id=opening["id"])
    try:
        opened(stream)
        events = [stream.next_event() for _ in missed]
    finally:
        stream.close()
    assert [e["event"] for e in events] == ["chat"] * 3
    # In order per channel (a replay goes channel by channel).
    by_channel = {
        c: [e["data"]["timestamp"] for e in events if e["data"]["channel"] == c] for c in "ab"
    }
    assert by_channel == {"a": [missed[0], missed[2]], "b": [missed[1]]}
    # Two rooms on one stream: the last id holds both cursors.
    position = decode_position(events[-1]["id"])
    assert (position["a"].cursor, position["b"].cursor) == (missed[2], missed[1])


def test_lost_messages_reach_the_client_as_a_reset_and_then_live(
    server: Server, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    stream = SSE(server.port, "/events/r/")
    try:
        last_id = opened(stream)["id"]
        replay_log.broadcast("r", "chat", "seen")
        last_id = stream.next_event()["id"]
    finally:
        stream.close()
    lost = [replay_log.broadcast("r", "chat", f"lost-{i}") for i in range(2)]
    rdb.zremrangebyscore("replay:r", "-inf", lost[-1])  # a prune past the client's cursor
    stream = SSE(server.port, "/events/r/", last_event_id=last_id)
    try:
        opened(stream)
        reset = stream.next_event()
        assert reset["event"] == "stream-reset" and reset["data"] == {"channels": ["r"]}
        assert decode_position(reset["id"])["r"].cursor == lost[-1]
        live = replay_log.broadcast("r", "chat", "live")
        assert stream.next_event()["data"]["timestamp"] == live
    finally:
        stream.close()
    # The reset's id resumes without a second reset.
    stream = SSE(server.port, "/events/r/", last_event_id=reset["id"])
    try:
        opened(stream)
        assert stream.next_event()["data"]["timestamp"] == live
    finally:
        stream.close()


@pytest.mark.parametrize("loss", ["flushall", "max_len", "expiry"])
def test_every_kind_of_loss_is_a_reset(
    server: Server, replay_log: replaylog.ReplayLog, replaylog_url: str, rdb: redis.Redis, loss: str
) -> None:
    stream = SSE(server.port, "/events/k/")
    try:
        opened(stream)
        replay_log.broadcast("k", "chat", "seen")
        last_id = stream.next_event()["id"]
    finally:
        stream.close()
    if loss == "flushall":  # Redis lost its data (a restart without persistence)
        rdb.flushall()
    elif loss == "max_len":  # trimmed by another process's cap
        capped = replaylog.ReplayLog(replaylog_url, max_len=2)
        for i in range(3):
            capped.broadcast("k", "chat", i)
        capped.close()
    else:  # the idle log expired; its bookkeeping outlives it
        replay_log.broadcast("k", "chat", "then gone")
        rdb.pexpire("replay:k", 1)
        wait_until(lambda: not rdb.exists("replay:k"), 5, "the log expired")
    replay_log.broadcast("k", "chat", "after the loss")
    stream = SSE(server.port, "/events/k/", last_event_id=last_id)
    try:
        opened(stream)
        reset = stream.next_event()
        assert reset["event"] == "stream-reset" and reset["data"] == {"channels": ["k"]}
        live = replay_log.broadcast("k", "chat", "live")
        assert stream.next_event()["data"]["timestamp"] == live
    finally:
        stream.close()


def test_a_reset_while_streaming_and_the_snapshot_hook(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    stream = SSE(server.port, "/events/s+t/?snapshot=1")
    try:
        opened(stream)
        first = replay_log.broadcast("s", "chat", 1)
        assert stream.next_event()["data"]["timestamp"] == first
        # The log is deleted under the stream: its next message starts a new history.
        replay_log.delete_log("s")
        fresh = replay_log.broadcast("s", "chat", 2)
        reset = stream.next_event()
        snapshot = stream.next_event()
        assert reset["event"] == "stream-reset" and reset["data"] == {"channels": ["s"]}
        assert "id" not in reset  # the position moves past the reset with the snapshot only
        assert snapshot["event"] == "snapshot" and snapshot["data"] == {"channel": "s", "size": 1}
        assert decode_position(snapshot["id"])["s"].cursor == fresh
        later = replay_log.broadcast("s", "chat", 3)
        assert stream.next_event()["data"]["timestamp"] == later
    finally:
        stream.close()


@pytest.mark.parametrize(
    "last_event_id",
    [
        "garbage",
        "lobby:1:2:3",
        "lobby:-5:",
        "lobby:99999999999999999999999:",
        "%ff%fe:1:",
        "lobby:1:," * 5000,  # oversized
        "other-channel:1:",
        "lobby:1:abc",
        "lobby:\x7f:",
        "",
    ],
)
def test_malformed_or_tampered_ids_read_as_an_unknown_history(
    server: Server, replay_log: replaylog.ReplayLog, last_event_id: str
) -> None:
    replay_log.broadcast("lobby", "chat", "x")
    stream = SSE(server.port, "/lobby/events/", last_event_id=last_event_id)
    try:
        opened(stream)
        if last_event_id == "":
            return  # an empty id is no id: the stream starts at "now"
        reset = stream.next_event()
        assert reset["event"] == "stream-reset" and reset["data"] == {"channels": ["lobby"]}
        live = replay_log.broadcast("lobby", "chat", "live")
        assert stream.next_event()["data"]["timestamp"] == live
    finally:
        stream.close()


def test_well_formed_ids_of_a_lost_history_reset(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    stamp = replay_log.broadcast("lobby", "chat", "x")
    epoch = replay_log.replay("lobby", stamp).epoch
    for tampered in (f"lobby:{stamp + 10**9}:{epoch}", f"lobby:{stamp}:{int(epoch or 0) + 1}"):
        stream = SSE(server.port, "/lobby/events/", last_event_id=tampered)
        try:
            opened(stream)
            assert stream.next_event()["event"] == "stream-reset", tampered
        finally:
            stream.close()


def test_event_names_cannot_inject_fields(server: Server, replay_log: replaylog.ReplayLog) -> None:
    stream = SSE(server.port, "/lobby/events/")
    try:
        opened(stream)
        evil = "chat\r\nid: 0\ndata: {}\r\n\r\nevent: stream-reset"
        replay_log.broadcast("lobby", evil, {"text": "line1\nline2\r\n\r\ndata: x"})
        replay_log.broadcast("lobby", "after", 1)
        first, second = stream.next_event(), stream.next_event()
    finally:
        stream.close()
    assert "event" not in first  # the browser dispatches it as "message"
    assert first["data"]["event_name"] == evil
    assert first["data"]["content"] == {"text": "line1\nline2\r\n\r\ndata: x"}
    assert decode_position(first["id"]) is not None
    assert second["event"] == "after"


def test_forbidden_and_too_many_channels_answer_before_the_stream(
    server: Server, rdb: redis.Redis
) -> None:
    forbidden = SSE(server.port, "/events/lobby+forbidden/")
    too_many = SSE(server.port, "/events/" + "+".join(f"c{i}" for i in range(33)) + "/")
    try:
        assert forbidden.status == 403
        assert too_many.status == 400
        assert "text/event-stream" not in forbidden.headers.get("content-type", "")
    finally:
        forbidden.close()
        too_many.close()
    assert pubsub_count(rdb) == 0


def test_redis_unreachable_ends_the_stream_for_the_browser_to_retry(server: Server) -> None:
    stream = SSE(server.port, "/unreachable/events/", last_event_id="x:1:")
    try:
        assert stream.status == 200
        frame = stream.next(timeout=30)
        assert int(frame["retry"]) > 0 and frame["comment"] == ["unavailable"]
        assert stream.frames.get(timeout=10) is None  # the stream ended, with no traceback
    finally:
        stream.close()


def test_the_header_wins_over_the_query_parameter(
    server: Server, replay_log: replaylog.ReplayLog
) -> None:
    stamps = [replay_log.broadcast("lobby", "chat", i) for i in range(3)]
    by_header, by_query = (f"lobby:{stamps[1]}:", f"lobby:{stamps[0]}:")
    stream = SSE(server.port, f"/lobby/events/?lastEventId={by_query}", last_event_id=by_header)
    try:
        opened(stream)
        assert stream.next_event()["data"]["timestamp"] == stamps[2]
    finally:
        stream.close()


def test_heartbeats_are_comments_without_ids(server: Server) -> None:
    stream = SSE(server.port, "/heartbeat/events/")
    try:
        opened(stream)
        beats = [stream.next(timeout=10) for _ in range(2)]
    finally:
        stream.close()
    for beat in beats:
        assert beat == {"comment": ["keep-alive"]}


def test_replay_past_the_cap_is_a_reset(server: Server, replay_log: replaylog.ReplayLog) -> None:
    cursor = replay_log.broadcast("capped", "chat", 0)
    stream = SSE(server.port, "/capped/events/")
    try:
        start = opened(stream)["id"]
    finally:
        stream.close()
    assert decode_position(start)["capped"].cursor == cursor
    three = [replay_log.broadcast("capped", "chat", i) for i in range(3)]
    stream = SSE(server.port, "/capped/events/", last_event_id=start)
    try:
        opened(stream)
        assert [stream.next_event()["data"]["timestamp"] for _ in three] == three
    finally:
        stream.close()
    replay_log.broadcast("capped", "chat", 4)  # four to replay: one past max_replay
    stream = SSE(server.port, "/capped/events/", last_event_id=start)
    try:
        opened(stream)
        reset = stream.next_event()
        assert reset["event"] == "stream-reset"
        live = replay_log.broadcast("capped", "chat", "live")
        assert stream.next_event()["data"]["timestamp"] == live
    finally:
        stream.close()


@pytest.mark.skipif(
    django.VERSION < (5, 0), reason="Django cancels a disconnected client's view from 5.0 on"
)
def test_disconnect_releases_the_pubsub_connection(server: Server, rdb: redis.Redis) -> None:
    streams = [SSE(server.port, "/events/a+b/") for _ in range(5)]
    for stream in streams:
        opened(stream)
    # The five streams share the server process's one pub/sub connection.
    assert pubsub_count(rdb) == 1
    assert rdb.pubsub_numsub("mq:a", "mq:b") == [(b"mq:a", 1), (b"mq:b", 1)]
    for stream in streams:
        stream.close()
    wait_until(lambda: pubsub_count(rdb) == 0, 5, "pubsub connections released")


def test_under_wsgi_one_thread_per_client(
    replay_log: replaylog.ReplayLog, replaylog_url: str, rdb: redis.Redis, tmp_path: Path
) -> None:
    env = server_env(replaylog_url)
    port = free_port()
    log_path = tmp_path / "runserver.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: port_open(port), 30, "runserver listening")
        stream = SSE(port, "/events/w/")
        try:
            start = opened(stream)["id"]
            stamp = replay_log.broadcast("w", "chat", "live")
            assert stream.next_event()["data"]["timestamp"] == stamp
        finally:
            stream.close()
        missed = replay_log.broadcast("w", "chat", "missed")
        stream = SSE(port, "/events/w/", last_event_id=start)
        try:
            opened(stream)
            assert [stream.next_event()["data"]["timestamp"] for _ in "ab"] == [stamp, missed]
        finally:
            stream.close()
        # The thread notices the disconnect at its next write (a heartbeat) and lets go.
        # (The two streams above, with 15 s heartbeats, may still hold theirs.)
        before = pubsub_count(rdb)
        stream = SSE(port, "/heartbeat/events/")
        opened(stream)
        stream.close()
        wait_until(lambda: pubsub_count(rdb) <= before, 10, "pubsub connection released")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "Traceback" not in log_path.read_text(errors="replace")
