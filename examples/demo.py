"""A client drops off a channel, messages keep coming, it reconnects and catches up.

Runs against REPLAYLOG_URL, or a redis-server on localhost:6379, or one it starts itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

import replaylog


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_redis(datadir: str) -> tuple[str, subprocess.Popen[bytes] | None]:
    if "REPLAYLOG_URL" in os.environ:
        return os.environ["REPLAYLOG_URL"], None
    if port_is_open(6379):
        return "redis://127.0.0.1:6379/0", None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            datadir,
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not port_is_open(port):
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("demo: redis-server did not start")
        time.sleep(0.05)
    print(f"started redis-server on port {port}")
    return f"redis://127.0.0.1:{port}/0", server


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="replaylog-demo-") as datadir:
        url, server = start_redis(datadir)
        try:
            run(url)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=10)


def run(url: str) -> None:
    channel = f"demo-room-{os.getpid()}"
    log = replaylog.ReplayLog(url, expire_ms=60_000)
    print(f"replay log on {log.url}, channel {channel!r}\n")

    print("1. the client is connected and sees each message as it is broadcast")
    last_seen = 0
    for text in ("hello", "hello", "anyone here?"):
        last_seen = log.broadcast(channel, "chat", {"user": "ada", "text": text})
        print(f"   live  {last_seen}  {text!r}")

    print("\n2. the client's network drops; messages keep coming (identical ones too)")
    missed = [("bob", "hi ada"), ("bob", "hi ada"), ("cy", "🎉 welcome")]
    for user, text in missed:
        log.broadcast(channel, "chat", {"user": user, "text": text})
    timestamps = log.broadcast_many([(channel, "typing", {"user": "bob"}) for _ in range(3)])
    print(f"   {len(missed) + len(timestamps)} messages broadcast while it was away")

    print(f"\n3. it reconnects and asks for everything after its cursor {last_seen}")
    for message in log.unspool(channel, last_seen):
        print(f"   replay {message['timestamp']}  {message['event_name']:6}  {message['content']}")
    assert len(log.unspool(channel, last_seen)) == len(missed) + len(timestamps)

    print("\n4. the cursor is a string on the wire; raw=True forwards stored JSON untouched")
    for raw in log.unspool(channel, str(timestamps[-2]), raw=True):
        print(f"   {raw}")

    print("\n5. a scheduled prune trims what is older than EXPIRE_REPLAY_LOGS_MS")
    time.sleep(0.05)
    removed = log.prune_replay_logs(expire_ms=1)
    print(f"   pruned {removed} entries; {len(log.unspool(channel, 0))} left in {channel!r}")


if __name__ == "__main__":
    main()
