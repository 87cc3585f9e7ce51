"""broadcast_on_commit with real transactions: SQLite databases and a real redis-server.

Run by tests/test_django.py in the Django suite's own pytest process, with pytest-django: tests
marked ``django_db(transaction=True)`` commit for real (``TransactionTestCase``), the others
(``django_db``) run inside a transaction that never commits (``TestCase``), where Django's
``captureOnCommitCallbacks`` shows what would run on commit. Subscribers are redis-py clients
subscribed to the ``mq:`` channels; faults (a stopped server, a paused one) are played on a
redis-server of the test's own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, transaction
from django.test import AsyncClient, Client, TestCase

import replaylog
from djangoproject.models import Message, Room
from replaylog.django import (
    PendingBroadcast,
    abroadcast_on_commit,
    broadcast_on_commit,
    broadcasts_in,
)

ROOM = "lobby"
EVENT = "message.created"
LOGGER = "replaylog.django.on_commit"
SENTINEL_CHANNEL = "__suite_on_commit_sentinel__"

transactional = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    """What the code inside a transaction raises to roll it back."""


class LiveMessages:
    """What Redis published on replaylog's ``mq:`` channels, as decoded JSON, in order.

    ``take()`` publishes a sentinel and returns every message received before it: Redis runs
    commands in order, so anything published before the call is in the list.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.psubscribe("mq:*", SENTINEL_CHANNEL)
        confirmed = 0
        while confirmed < 2:
            message = self.pubsub.get_message(timeout=10)
            assert message is not None, "PSUBSCRIBE was never confirmed"
            confirmed += message["type"] == "psubscribe"

    def take(self) -> list[tuple[str, Any]]:
        token = uuid.uuid4().hex
        self.client.publish(SENTINEL_CHANNEL, token)
        received: list[tuple[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=1)
            if message is None or message["type"] != "pmessage":
                continue
            channel = message["channel"].decode()
            if channel == SENTINEL_CHANNEL:
                if message["data"].decode() == token:
                    return received
                continue
            received.append((channel.removeprefix("mq:"), json.loads(message["data"])))
        raise AssertionError("the sentinel message never arrived")

    def close(self) -> None:
        self.pubsub.close()


class DedicatedRedis:
    """A redis-server of one test's own, to stop or pause without disturbing the others."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "redis-server exited"
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server never answered"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def rdb(replaylog_redis_proc: Any) -> Iterator[redis.Redis]:
    with redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port) as client:
        yield client


@pytest.fixture
def live(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> Iterator[LiveMessages]:
    messages = LiveMessages(rdb)
    yield messages
    messages.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[DedicatedRedis]:
    server = DedicatedRedis(tmp_path)
    yield server
    server.stop()


def stored(log: replaylog.ReplayLog, channel: str = ROOM) -> list[dict[str, Any]]:
    return log.unspool(channel, 0)


def script_runs(client: redis.Redis) -> int:
    """How many times Redis ran a script (a broadcast) since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_eval"))


# --- commit, rollback, savepoints ------------------------------------------------------------


@transactional
def test_commit_publishes_once_and_only_after_the_commit(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    with transaction.atomic():
        message = Message.objects.create(room=ROOM, author="ann", text="hi")
        pending = broadcast_on_commit(ROOM, EVENT, message.as_event())
        # Inside the transaction the row is invisible to others: so is the message.
        assert live.take() == [] and stored(replay_log) == []
        assert pending.timestamp is None

    expected = {"event_name": EVENT, "content": message.as_event(), "timestamp": pending.timestamp}
    assert isinstance(pending.timestamp, int)
    assert stored(replay_log) == [expected]
    assert live.take() == [(ROOM, expected)]
    assert Message.objects.get(pk=message.pk).text == "hi"


@transactional
def test_outside_a_transaction_it_broadcasts_at_once(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    message = Message.objects.create(room=ROOM, author="ann", text="hi")  # autocommit
    pending = broadcast_on_commit(ROOM, EVENT, message.as_event())

    assert isinstance(pending.timestamp, int)
    assert [m["timestamp"] for m in stored(replay_log)] == [pending.timestamp]
    assert [content["content"] for _, content in live.take()] == [message.as_event()]


@transactional
def test_rollback_publishes_nothing(replay_log: replaylog.ReplayLog, live: LiveMessages) -> None:
    with pytest.raises(Boom), transaction.atomic():
        message = Message.objects.create(room=ROOM, author="ann", text="rolled back")
        pending = broadcast_on_commit(ROOM, EVENT, message.as_event())
        raise Boom

    assert not Message.objects.exists()
    assert pending.timestamp is None
    assert stored(replay_log) == [] and live.take() == []


@transactional
def test_savepoint_rollback_drops_only_the_broadcasts_inside_it(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    plain_callbacks_run: list[str] = []

    def schedule(name: str) -> None:
        """A broadcast, and beside it a plain on_commit callback: both or neither must run."""
        broadcast_on_commit(ROOM, name, None)
        transaction.on_commit(lambda: plain_callbacks_run.append(name))

    with transaction.atomic():
        schedule("outer")
        with pytest.raises(Boom), transaction.atomic():  # a savepoint, rolled back
            schedule("in-rolled-back-savepoint")
            with transaction.atomic():  # released into the savepoint, then lost with it
                schedule("in-nested-savepoint")
            raise Boom
        with transaction.atomic():  # a savepoint released into the outer transaction
            schedule("in-kept-savepoint")
        # As on_commit: a savepoint made by hand is not tracked, its rollback drops nothing.
        sid = transaction.savepoint()
        schedule("after-manual-savepoint")
        transaction.savepoint_rollback(sid)
        schedule("last")
        assert live.take() == [] and plain_callbacks_run == []

    kept = ["outer", "in-kept-savepoint", "after-manual-savepoint", "last"]
    assert plain_callbacks_run == kept
    assert [m["event_name"] for m in stored(replay_log)] == kept
    assert [message["event_name"] for _, message in live.take()] == kept


@transactional
def test_atomic_requests_view_publishes_after_the_commit_and_not_after_a_rollback(
    replay_log: replaylog.ReplayLog,
    live: LiveMessages,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ATOMIC_REQUESTS for this test only: every other test of the suite runs its views without
    # a database.
    monkeypatch.setitem(connections.settings["default"], "ATOMIC_REQUESTS", True)
    Room.objects.create(name=ROOM)

    response = client.post(f"/rooms/{ROOM}/posts/", {"author": "ann", "text": "hello"})
    assert response.status_code == 201
    message = Message.objects.get(pk=response.json()["id"])
    [published] = live.take()
    assert published == (ROOM, stored(replay_log)[0])
    assert published[1]["content"] == {"id": message.pk, "author": "ann", "text": "hello"}
    assert Room.objects.get(name=ROOM).message_count == 1

    # The view saves the message, schedules its broadcast, then finds no such room: the 404
    # rolls the whole request back, the broadcast with it.
    response = client.post("/rooms/nowhere/posts/", {"text": "into the void"})
    assert response.status_code == 404
    assert not Message.objects.filter(room="nowhere").exists()
    assert stored(replay_log, "nowhere") == [] and live.take() == []


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_using_waits_for_the_transaction_of_that_database(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    with transaction.atomic(using="other"):
        Message.objects.using("other").create(room=ROOM, author="ann", text="on other")
        broadcast_on_commit(ROOM, "on-other", 1, using="other")
        # "default" is in autocommit: a broadcast waiting for it goes at once.
        broadcast_on_commit(ROOM, "on-default", 2)
        assert [m["event_name"] for m in stored(replay_log)] == ["on-default"]
    assert [m["event_name"] for m in stored(replay_log)] == ["on-default", "on-other"]

    with pytest.raises(Boom), transaction.atomic(using="other"), transaction.atomic():
        broadcast_on_commit(ROOM, "rolled-back-on-other", 3, using="other")
        broadcast_on_commit(ROOM, "rolled-back-on-default", 4)
        raise Boom
    with transaction.atomic(), transaction.atomic(using="other"):
        broadcast_on_commit(ROOM, "committed-on-other", 5, using="other")
        broadcast_on_commit(ROOM, "committed-on-default", 6)
    # The inner block ("other") commits first, so its broadcast goes first.
    assert [m["event_name"] for _, m in live.take()] == [
        "on-default",
        "on-other",
        "committed-on-other",
        "committed-on-default",
    ]
    assert Message.objects.using("other").count() == 1 and not Message.objects.exists()


# --- content, keys, bad input ------------------------------------------------------------------


@transactional
def test_content_is_serialized_at_the_call(replay_log: replaylog.ReplayLog) -> None:
    content: dict[str, Any] = {"text": "as sent", "tags": ["a"]}
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with transaction.atomic():
        pending = broadcast_on_commit(ROOM, EVENT, content)
        with_default = broadcast_on_commit(
            ROOM, "dated", {"at": when}, default=DjangoJSONEncoder().default
        )
        content["text"] = "changed after the call"
        content["tags"].append("b")
        content["extra"] = True
        assert pending.content == {"text": "as sent", "tags": ["a"]}

    [first, second] = stored(replay_log)
    assert first["content"] == {"text": "as sent", "tags": ["a"]}
    assert second["content"] == {"at": "2026-01-02T03:04:05Z"}
    assert (first["timestamp"], second["timestamp"]) == (pending.timestamp, with_default.timestamp)


@transactional
def test_bad_input_raises_at_the_call_and_schedules_nothing(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    with transaction.atomic():
        message = Message.objects.create(room=ROOM, author="ann", text="kept")
        scheduled = len(transaction.get_connection().run_on_commit)
        with pytest.raises(TypeError, match="not JSON serializable"):
            broadcast_on_commit(ROOM, EVENT, {"when": object()})
        with pytest.raises(ValueError, match="NaN"):
            broadcast_on_commit(ROOM, EVENT, {"ratio": math.nan})
        with pytest.raises(TypeError, match="channel must be str"):
            broadcast_on_commit(42, EVENT, {})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="event_name must be str"):
            broadcast_on_commit(ROOM, None, {})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="idempotency_key must be str"):
            broadcast_on_commit(ROOM, EVENT, {}, idempotency_key=7)  # type: ignore[arg-type]
        with pytest.raises(UnicodeEncodeError):
            broadcast_on_commit("lone \ud800 surrogate", EVENT, {})
        assert len(transaction.get_connection().run_on_commit) == scheduled
        broadcast_on_commit(ROOM, EVENT, message.as_event())

    assert [m["content"] for m in stored(replay_log)] == [message.as_event()]
    assert len(live.take()) == 1


@transactional
def test_a_retried_request_with_the_same_key_publishes_once(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    first = broadcast_on_commit(ROOM, EVENT, {"n": 1}, idempotency_key="post-abc")
    with transaction.atomic():
        again = broadcast_on_commit(ROOM, EVENT, {"n": 1}, idempotency_key="post-abc")
    assert again.idempotency_key == "post-abc"
    assert again.timestamp == first.timestamp
    again()  # calling a broadcast twice publishes nothing more either
    assert again.timestamp == first.timestamp
    assert len(stored(replay_log)) == 1 and len(live.take()) == 1

    # Without a key of the caller's, each call gets its own.
    one, two = (broadcast_on_commit(ROOM, EVENT, {"n": 1}) for _ in range(2))
    assert one.idempotency_key != two.idempotency_key
    assert len(stored(replay_log)) == 3


# --- Redis failing after the commit ------------------------------------------------------------


@transactional
def test_redis_down_at_commit_is_logged_not_raised(
    own_redis: DedicatedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    log = replaylog.ReplayLog(own_redis.url)
    log.broadcast("warm-up", "connected", 0)
    secret = f"secret-{uuid.uuid4().hex}"
    ran_after = []
    with transaction.atomic():
        message = Message.objects.create(room=ROOM, author="ann", text=secret)
        pending = log.broadcast_on_commit(ROOM, EVENT, message.as_event())
        transaction.on_commit(lambda: ran_after.append("next callback"))
        own_redis.stop()

    # Committed, not raised, and the callbacks after it still ran.
    assert Message.objects.get(pk=message.pk).text == secret
    assert ran_after == ["next callback"]
    assert pending.timestamp is None
    records = [record for record in caplog.records if record.name == LOGGER]
    assert [record.levelname for record in records] == ["WARNING", "ERROR"]
    for record in records:
        assert (record.channel, record.event_name) == (ROOM, EVENT)  # type: ignore[attr-defined]
        assert repr(ROOM) in record.getMessage() and repr(EVENT) in record.getMessage()
    assert "retrying once" in records[0].getMessage()
    assert records[1].exc_info is not None
    assert isinstance(records[1].exc_info[1], replaylog.ConnectionError)
    everything_logged = "\n".join(logging.Formatter().format(record) for record in records)
    assert secret not in everything_logged
    assert secret not in repr(pending)

    own_redis.start()
    with transaction.atomic():
        back = log.broadcast_on_commit(ROOM, EVENT, {"n": 2})
    assert [m["timestamp"] for m in log.unspool(ROOM, 0)] == [back.timestamp]
    log.close()


class UnpauseBeforeTheRetry(logging.Handler):
    """Lets Redis run the commands it held once the first attempt has been given up."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(logging.WARNING)
        self.client = client

    def emit(self, record: logging.LogRecord) -> None:
        self.client.execute_command("CLIENT", "UNPAUSE")


@transactional
def test_a_retry_after_a_lost_reply_does_not_publish_twice(
    own_redis: DedicatedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    log = replaylog.ReplayLog(own_redis.url, response_timeout=2)
    log.broadcast("warm-up", "connected", 0)  # connected and the script loaded
    client = own_redis.client()
    live = LiveMessages(client)
    client.config_resetstat()
    unpause = UnpauseBeforeTheRetry(client)
    logging.getLogger(LOGGER).addHandler(unpause)
    # Redis holds every write until unpaused: the first attempt's reply never comes in time,
    # and only then (the warning) does Redis run it, and the retry after it.
    client.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")
    try:
        with transaction.atomic():
            pending = log.broadcast_on_commit(ROOM, EVENT, {"text": "once"})
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        logging.getLogger(LOGGER).removeHandler(unpause)

    records = [record for record in caplog.records if record.name == LOGGER]
    assert [record.levelname for record in records] == ["WARNING"]
    assert "TimeoutError" in records[0].getMessage()
    assert script_runs(client) == 2  # both attempts ran in Redis...
    [message] = log.unspool(ROOM, 0)  # ...and stored one message,
    assert message["content"] == {"text": "once"}
    assert pending.timestamp == message["timestamp"]  # whose timestamp the retry got back
    assert live.take() == [(ROOM, message)]  # published once
    live.close()
    client.close()
    log.close()


# --- async ---------------------------------------------------------------------------------------


@transactional
def test_async_view_broadcasts_at_once(replay_log: replaylog.ReplayLog) -> None:
    async def post() -> Any:
        return await AsyncClient().post(f"/async/rooms/{ROOM}/posts/", {"text": "hi"})

    response = asyncio.run(post())
    assert response.status_code == 201
    [message] = stored(replay_log)
    assert message["timestamp"] == response.json()["timestamp"]
    assert message["content"] == Message.objects.get(pk=response.json()["id"]).as_event()


@transactional
def test_async_form_waits_for_the_transaction_around_it(
    replay_log: replaylog.ReplayLog, live: LiveMessages
) -> None:
    async def notify(text: str) -> PendingBroadcast:
        return await abroadcast_on_commit(ROOM, EVENT, {"text": text})

    with transaction.atomic():
        pending = async_to_sync(notify)("committed")
        assert pending.timestamp is None and stored(replay_log) == []
    with pytest.raises(Boom), transaction.atomic():
        async_to_sync(notify)("rolled back")
        raise Boom

    assert [(m["content"], m["timestamp"]) for m in stored(replay_log)] == [
        ({"text": "committed"}, pending.timestamp)
    ]
    assert len(live.take()) == 1


@transactional
def test_async_form_logs_a_failure_and_does_not_raise(
    own_redis: DedicatedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    log = replaylog.ReplayLog(own_redis.url)
    own_redis.stop()

    pending = asyncio.run(log.abroadcast_on_commit(ROOM, EVENT, {"text": "secret"}))

    assert pending.timestamp is None
    records = [record for record in caplog.records if record.name == LOGGER]
    assert [record.levelname for record in records] == ["WARNING", "ERROR"]
    assert all(record.channel == ROOM for record in records)  # type: ignore[attr-defined]
    assert "secret" not in "\n".join(logging.Formatter().format(record) for record in records)
    log.close()


# --- asserting what a view broadcast, in tests whose transaction never commits ------------------


@pytest.mark.django_db
def test_plugin_fixture_captures_what_a_view_broadcast_on_commit(
    replay_log: replaylog.ReplayLog, client: Client, replaylog_capture_on_commit: Any
) -> None:
    Room.objects.create(name=ROOM)
    with replaylog_capture_on_commit() as broadcasts:
        response = client.post(f"/rooms/{ROOM}/posts/", {"author": "ann", "text": "hi"})
        assert broadcasts == []  # filled when the block ends
    [pending] = broadcasts
    assert (pending.channel, pending.event_name, pending.content) == (
        ROOM,
        EVENT,
        {"id": response.json()["id"], "author": "ann", "text": "hi"},
    )
    assert pending.timestamp is None and stored(replay_log) == []  # not executed

    with replaylog_capture_on_commit(execute=True) as broadcasts:
        client.post(f"/rooms/{ROOM}/posts/", {"text": "again"})
        client.post(f"/rooms/{ROOM}/posts/", {"text": "and again"})
    assert [b.content["text"] for b in broadcasts] == ["again", "and again"]
    assert [m["timestamp"] for m in stored(replay_log)] == [b.timestamp for b in broadcasts]


@pytest.mark.django_db
def test_broadcasts_in_picks_them_from_django_capture_on_commit_callbacks(
    replay_log: replaylog.ReplayLog, client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    Room.objects.create(name=ROOM)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        transaction.on_commit(lambda: None)  # not a broadcast
        client.post(f"/rooms/{ROOM}/posts/", {"text": "hi"})
    assert len(callbacks) == 2
    [pending] = broadcasts_in(callbacks)
    assert pending.content["text"] == "hi"
    assert [m["timestamp"] for m in stored(replay_log)] == [pending.timestamp]


@pytest.mark.django_db
def test_broadcasts_in_picks_them_from_testcase_capture_on_commit_callbacks(
    replay_log: replaylog.ReplayLog,
) -> None:
    with TestCase.captureOnCommitCallbacks(execute=False) as callbacks:
        broadcast_on_commit(ROOM, EVENT, {"n": 1})
    [pending] = broadcasts_in(callbacks)
    assert (pending.event_name, pending.content, pending.timestamp) == (EVENT, {"n": 1}, None)
    pending()  # what the commit would do
    assert [m["timestamp"] for m in stored(replay_log)] == [pending.timestamp]
