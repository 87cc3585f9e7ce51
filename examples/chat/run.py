"""Runs the chat example on http://127.0.0.1:8000/ (``--port`` to change it).

It uses ``REPLAYLOG_URL`` if set, else a redis-server on localhost:6379, else one it starts
itself on a free port (and stops on exit). Needs uvicorn (in replaylog's ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("run.py: no Redis at localhost:6379 and no redis-server to start")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="chat-redis-")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not listening("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("run.py: redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    # A plain `kill` ends the chat the way Ctrl-C does, stopping the redis-server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    env = dict(os.environ)
    redis_proc = None
    if "REPLAYLOG_URL" not in env and not listening("localhost", 6379):
        redis_proc, env["REPLAYLOG_URL"] = start_redis()
        print(f"run.py: started redis-server at {env['REPLAYLOG_URL']}", flush=True)
    print(f"run.py: the chat is on http://127.0.0.1:{args.port}/", flush=True)
    command = [sys.executable, "-m", "uvicorn", "chat.asgi:application", "--port", str(args.port)]
    try:
        subprocess.run(command, cwd=HERE, env=env)
    except KeyboardInterrupt:
        pass
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)


if __name__ == "__main__":
    main()
