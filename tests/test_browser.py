"""The chat example (examples/chat/) in a real Chromium: Debian's ``chromium`` driven by
Playwright, the page's own ``EventSource`` against uvicorn and the test redis-server.

One browser for the module. The server is killed and started again on the same port to cut
the page's connection; the browser reconnects by itself with ``Last-Event-ID``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port
from playwright import sync_api as playwright_api
from test_asgi import pubsub_count, wait_until
from test_event_stream import port_open

import replaylog

CHROMIUM = "/usr/bin/chromium"
CHAT = Path(__file__).resolve().parents[1] / "examples" / "chat"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "chat.png"


class ChatServer:
    """``uvicorn chat.asgi:application`` on a fixed port, so it can be killed and restarted."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLAYLOG_", "DJANGO_"))}
        env["REPLAYLOG_URL"] = self.redis_url
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "uvicorn", "chat.asgi:application", "--host",
                    "127.0.0.1", "--port", str(self.port), "--lifespan", "off",
                    "--no-access-log", "--log-level", "warning",
                ],
                cwd=CHAT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: port_open(self.port), 30, "uvicorn listening")

    def kill(self) -> None:
        """A crash: the connections drop at once."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
            ],
            viewport={"width": 1000, "height": 300},
        )  # fmt: skip
        yield context
        context.close()


@pytest.fixture
def chat(
    replay_log: replaylog.ReplayLog, replaylog_url: str, tmp_path: Path
) -> Iterator[ChatServer]:
    server = ChatServer(replaylog_url, tmp_path / "uvicorn.log")
    yield server
    server.kill()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log


@pytest.fixture
def page(browser_context: Any) -> Iterator[Any]:
    page = browser_context.new_page()
    yield page
    page.close()


def open_room(page: Any, chat: ChatServer, rooms: str) -> None:
    page.goto(chat.url(f"/rooms/{rooms}/"))
    page.wait_for_function("window.opens >= 1", timeout=15_000)


def texts(page: Any, channel: str) -> list[str]:
    selector = f'section[data-channel="{channel}"] .messages li span'
    return [str(t) for t in page.locator(selector).all_text_contents()]


def received(page: Any) -> list[tuple[str, int]]:
    return [(str(c), int(t)) for c, t in page.evaluate("window.received")]


def say(log: replaylog.ReplayLog, room: str, text: str, author: str = "ada") -> int:
    return log.broadcast(f"chat:{room}", "chat", {"author": author, "text": text})


def test_live_delivery_and_posting_from_the_page(
    page: Any, chat: ChatServer, replay_log: replaylog.ReplayLog
) -> None:
    say(replay_log, "lobby", "rendered with the page")
    open_room(page, chat, "lobby")
    assert texts(page, "chat:lobby") == ["rendered with the page"]
    stamp = say(replay_log, "lobby", "live")
    page.wait_for_function("window.received.length >= 1", timeout=10_000)
    assert received(page) == [("chat:lobby", stamp)]
    # The page's own form posts; the message comes back on the stream.
    page.fill('form[data-room="lobby"] input[name=text]', "from the page")
    page.click('form[data-room="lobby"] button')
    page.wait_for_function("window.received.length >= 2", timeout=10_000)
    assert texts(page, "chat:lobby") == ["rendered with the page", "live", "from the page"]


def test_a_cut_connection_resumes_exactly_once_in_order(
    page: Any, chat: ChatServer, replay_log: replaylog.ReplayLog
) -> None:
    open_room(page, chat, "lobby")
    total = 100
    sent: list[int] = []

    def broadcast() -> None:
        for i in range(total):
            sent.append(say(replay_log, "lobby", f"m{i}"))
            time.sleep(0.03)

    publisher = threading.Thread(target=broadcast)
    publisher.start()
    try:
        # Cut the connection twice while messages keep coming.
        for cut_at in (15, 35):
            wait_until(lambda n=cut_at: len(sent) >= n, 30, f"{cut_at} messages sent")
            opens = page.evaluate("window.opens")
            chat.kill()
            time.sleep(0.3)  # messages broadcast while the server is down
            chat.start()
            page.wait_for_function(f"window.opens > {opens}", timeout=30_000)
    finally:
        publisher.join()
    page.wait_for_function(f"window.received.length >= {total}", timeout=30_000)
    time.sleep(0.5)  # anything extra (a duplicate) would arrive now
    assert received(page) == [("chat:lobby", t) for t in sent]
    assert texts(page, "chat:lobby") == [f"m{i}" for i in range(total)]
    assert page.evaluate("window.opens") == 3
    assert page.evaluate("window.resets") == []


def test_a_prune_past_the_cursor_reaches_the_page_as_a_reset(
    page: Any, chat: ChatServer, replay_log: replaylog.ReplayLog
) -> None:
    say(replay_log, "help", "before")
    open_room(page, chat, "help")
    chat.kill()
    for i in range(3):
        say(replay_log, "help", f"lost-{i}")
    time.sleep(0.01)
    assert replay_log.prune_replay_logs(1, channel="chat:help") == 4
    kept = say(replay_log, "help", "after the prune")
    chat.start()
    page.wait_for_function("window.resets.length >= 1", timeout=15_000)
    assert page.evaluate("window.resets") == [["chat:help"]]
    # The snapshot replaced the room's state with what the log keeps now.
    page.wait_for_function("document.querySelector('.notice') !== null", timeout=10_000)
    assert texts(page, "chat:help")[:1] == ["after the prune"]
    live = say(replay_log, "help", "live again")
    page.wait_for_function("window.received.length >= 1", timeout=10_000)
    assert received(page) == [("chat:help", live)]
    assert kept < live


def test_two_rooms_on_one_event_source_and_the_screenshot(
    page: Any, chat: ChatServer, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    say(replay_log, "lobby", "Welcome to the lobby!", author="grace")
    say(replay_log, "random", "Anyone up for lunch?", author="linus")
    open_room(page, chat, "lobby+random")
    # One EventSource, so one pub/sub connection, for both rooms.
    assert pubsub_count(rdb) == 1
    sent = [
        ("lobby", say(replay_log, "lobby", "Reconnect all you like: nothing is lost.")),
        ("random", say(replay_log, "random", "I'm in.", author="grace")),
        ("lobby", say(replay_log, "lobby", "…and nothing comes twice.", author="linus")),
    ]
    page.wait_for_function("window.received.length >= 3", timeout=10_000)
    got = received(page)
    for room in ("lobby", "random"):
        assert [t for c, t in got if c == f"chat:{room}"] == [t for r, t in sent if r == room]
    assert texts(page, "chat:random") == ["Anyone up for lunch?", "I'm in."]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
