"""The tiny Django project's own tests, written as a user of replaylog would write them.

tests/test_django.py runs this file in a separate pytest process with
``DJANGO_SETTINGS_MODULE=djangoproject.settings``, so Django is never configured inside the main
test process (where it would change how every other test resolves replaylog's settings). The
``replay_log`` and ``replaylog_redis_proc`` fixtures come from replaylog's pytest plugin, which that
process loads through its ``pytest11`` entry point. ``REPLAYLOG_URL`` in the environment points at a
port nothing listens on, so anything that escaped the test server would fail loudly.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangoproject.settings")
django.setup()

import pytest  # noqa: E402
import redis  # noqa: E402
from conftest import redis_now_ms  # noqa: E402  (tests/ is on PYTHONPATH: test_django.py)
from django.apps import apps  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core import checks  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import SystemCheckError  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402

import replaylog  # noqa: E402
from replaylog import _settings as replaylog_settings  # noqa: E402
from replaylog.django.apps import ReplayLogConfig  # noqa: E402
from replaylog.django.checks import CHECK_IDS  # noqa: E402

ROOM = "room-1"
URL = f"/rooms/{ROOM}/messages/"


@pytest.fixture
def client() -> Client:
    return Client()


@pytest.fixture
def rdb(replaylog_redis_proc: Any) -> Iterator[redis.Redis]:
    with redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port) as r:
        yield r


def legacy_entry(r: redis.Redis, channel: str, text: str, timestamp: int) -> str:
    """What the article's broadcast stored (json.dumps of the message, scored by its timestamp)."""
    member = json.dumps({"event_name": "chat", "content": text, "timestamp": timestamp})
    r.zadd(f"replay:{channel}", {member: timestamp})
    return member


def replaylog_errors() -> list[checks.CheckMessage]:
    return [m for m in checks.run_checks() if (m.id or "").startswith("replaylog.")]


# --- the views, asserted through the replay_log fixture ---------------------------------------


def test_view_broadcast_is_in_the_replay_log(
    replay_log: replaylog.ReplayLog, client: Client, rdb: redis.Redis
) -> None:
    pubsub = rdb.pubsub()
    pubsub.subscribe(f"mq:{ROOM}")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    response = client.post(URL, {"author": "ann", "text": "hello"})

    assert response.status_code == 201
    timestamp = response.json()["timestamp"]
    assert isinstance(timestamp, int) and timestamp > 0
    expected = {"event_name": "chat", "content": {"author": "ann", "text": "hello"}}
    expected["timestamp"] = timestamp
    assert replay_log.unspool(ROOM, 0) == [expected]
    # The article's layout: one ZSET member scored by the timestamp, and the same JSON published.
    [(member, score)] = rdb.zrangebyscore(f"replay:{ROOM}", "-inf", "+inf", withscores=True)
    assert score == timestamp and json.loads(member) == expected
    live = pubsub.get_message(timeout=5)
    assert live is not None and live["channel"] == f"mq:{ROOM}".encode()
    assert json.loads(live["data"]) == expected
    pubsub.close()


def test_view_replays_what_a_client_missed(replay_log: replaylog.ReplayLog, client: Client) -> None:
    stamps = [client.post(URL, {"text": f"m{i}"}).json()["timestamp"] for i in range(4)]
    assert stamps == sorted(set(stamps))  # strictly increasing, even within one millisecond

    def texts(since: Any) -> list[str]:
        response = client.get(URL, {"since": since})
        assert response.status_code == 200
        messages = response.json()["messages"]
        assert [m["timestamp"] for m in messages] == sorted(m["timestamp"] for m in messages)
        return [m["content"]["text"] for m in messages]

    assert texts(stamps[0]) == ["m1", "m2", "m3"]
    assert texts(stamps[2]) == ["m3"]
    assert texts(stamps[3]) == []
    assert texts(0) == ["m0", "m1", "m2", "m3"]
    assert [m["content"]["text"] for m in client.get(URL).json()["messages"]] == [
        "m0",
        "m1",
        "m2",
        "m3",
    ]
    assert client.get("/rooms/room-2/messages/").json() == {"messages": []}
    assert client.get(URL, {"since": "yesterday"}).status_code == 400


def test_rejected_post_broadcasts_nothing(replay_log: replaylog.ReplayLog, client: Client) -> None:
    assert client.post(URL, {"author": "ann"}).status_code == 400
    assert replay_log.unspool(ROOM, 0) == []


def test_redis_is_clean_for_each_test(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    # The tests above wrote to room-1; the fixture flushed it before this one.
    assert replay_log.unspool(ROOM, 0) == []
    assert rdb.dbsize() == 0


# --- settings: read lazily, override_settings works -------------------------------------------


def test_override_settings_changes_the_url(
    replay_log: replaylog.ReplayLog,
    replaylog_redis_proc: Any,
    replaylog_url: str,
    client: Client,
    rdb: redis.Redis,
) -> None:
    db3_url = replaylog_url.rsplit("/", 1)[0] + "/3"
    with redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port, db=3) as db3:
        db3.flushdb()
        with override_settings(REPLAYLOG_URL=db3_url):
            assert replaylog.get_default().url == db3_url
            timestamp = replaylog.broadcast(ROOM, "chat", {"n": 1})
            assert client.post(URL, {"text": "via the view"}).status_code == 201
            assert db3.zcard(f"replay:{ROOM}") == 2
            assert rdb.zcard(f"replay:{ROOM}") == 0
            [first, _] = replaylog.unspool(ROOM, 0)
            assert first["timestamp"] == timestamp
        # Back to the fixture's server (database 0) once the override ends.
        assert replaylog.get_default().url == replaylog_url
        replaylog.broadcast(ROOM, "chat", {"n": 2})
        assert [m["content"] for m in replay_log.unspool(ROOM, 0)] == [{"n": 2}]
        assert db3.zcard(f"replay:{ROOM}") == 2
        db3.flushdb()

    with override_settings(REPLAYLOG_URL="redis://127.0.0.1:1/0", REPLAYLOG_CONNECT_TIMEOUT=2):
        with pytest.raises(replaylog.ConnectionError):
            replaylog.broadcast(ROOM, "chat", {"n": 3})
    assert [m["content"] for m in replaylog.unspool(ROOM, 0)] == [{"n": 2}]


def test_module_prune_honours_expiry_from_django_settings(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.EXPIRE_REPLAY_LOGS_MS == 60_000
    # Django settings come before the environment: were this used, everything would go.
    monkeypatch.setenv("EXPIRE_REPLAY_LOGS_MS", "1")
    now = redis_now_ms(rdb)
    legacy_entry(rdb, "room-a", "old-1", now - 120_000)
    legacy_entry(rdb, "room-a", "old-2", now - 90_000)
    kept_a = [
        legacy_entry(rdb, "room-a", t, now - age)
        for t, age in (("new-1", 30_000), ("new-2", 1_000))
    ]
    legacy_entry(rdb, "room-b", "old-3", now - 200_000)
    kept_b = [legacy_entry(rdb, "room-b", "new-3", now - 10_000)]

    assert replaylog.get_default().expire_ms == 60_000
    assert replaylog.prune_replay_logs() == 3

    assert rdb.zrange("replay:room-a", 0, -1) == [m.encode() for m in kept_a]
    assert rdb.zrange("replay:room-b", 0, -1) == [m.encode() for m in kept_b]
    assert [m["content"] for m in replaylog.unspool("room-a", 0)] == ["new-1", "new-2"]
    assert replaylog.prune_replay_logs() == 0


def test_override_settings_changes_the_expiry(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    now = redis_now_ms(rdb)
    for text, age in (("2min", 120_000), ("30s", 30_000), ("1s", 1_000)):
        legacy_entry(rdb, ROOM, text, now - age)

    with override_settings(EXPIRE_REPLAY_LOGS_MS=10_000):
        assert replaylog.get_default().expire_ms == 10_000
        assert replaylog.prune_replay_logs() == 2
    assert [m["content"] for m in replaylog.unspool(ROOM, 0)] == ["1s"]
    assert replaylog.get_default().expire_ms == 60_000

    legacy_entry(rdb, ROOM, "30s-again", now - 30_000)
    assert replaylog.prune_replay_logs() == 0  # 60 s again: the 30 s old entry stays
    with override_settings(EXPIRE_REPLAY_LOGS_MS="20000"):  # a numeric string, as from env files
        assert replaylog.prune_replay_logs() == 1
    assert [m["content"] for m in replaylog.unspool(ROOM, 0)] == ["1s"]


def test_fixture_server_survives_an_override_of_another_setting(
    replay_log: replaylog.ReplayLog, client: Client
) -> None:
    # Overriding a replaylog setting rebuilds the default log from settings; REPLAYLOG_URL in the
    # environment and settings.py points nowhere, so only the fixture keeps this on the test server.
    with override_settings(REPLAYLOG_RESPONSE_TIMEOUT=3):
        assert replaylog.get_default().response_timeout == 3.0
        assert client.post(URL, {"text": "still here"}).status_code == 201
    assert [m["content"]["text"] for m in replay_log.unspool(ROOM, 0)] == ["still here"]


# --- the async views, on replaylog's asyncio API, through Django's AsyncClient (ASGI) ---------
# pytest-asyncio is not used: each test runs its coroutine with asyncio.run.

ASYNC_URL = f"/async/rooms/{ROOM}/messages/"
STREAM_URL = f"/rooms/{ROOM}/stream/"


def sse_events(chunks: list[bytes]) -> list[dict[str, Any]]:
    """Server-sent events, as ``{"comment"}``, ``{"event", "data"}`` or ``{"id", "data"}``."""
    events: list[dict[str, Any]] = []
    for block in b"".join(chunks).decode().split("\n\n"):
        if not block:
            continue
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields[name or "comment"] = json.loads(value) if name == "data" else value
        events.append(fields)
    return events


async def await_no_pubsub(rdb: redis.Redis, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while rdb.client_list(_type="pubsub"):
        assert time.monotonic() < deadline, f"pubsub still open: {rdb.client_list(_type='pubsub')}"
        await asyncio.sleep(0.02)


def test_async_view_broadcast_is_in_the_replay_log(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    async def main() -> list[int]:
        client = AsyncClient()
        response = await client.post(ASYNC_URL, {"author": "ann", "text": "hello"})
        assert response.status_code == 201
        first = response.json()["timestamp"]
        # Concurrent requests on one event loop: each gets its own, strictly increasing stamp.
        responses = await asyncio.gather(
            *(client.post(ASYNC_URL, {"text": f"m{i}"}) for i in range(50))
        )
        assert [r.status_code for r in responses] == [201] * 50
        return [first, *(r.json()["timestamp"] for r in responses)]

    stamps = asyncio.run(main())
    assert len(set(stamps)) == 51 and stamps[0] == min(stamps)
    logged = replay_log.unspool(ROOM, 0)
    assert [m["timestamp"] for m in logged] == sorted(stamps)
    assert logged[0] == {
        "event_name": "chat",
        "content": {"author": "ann", "text": "hello"},
        "timestamp": stamps[0],
    }
    by_text = {m["content"]["text"]: m["timestamp"] for m in logged}
    assert [by_text[f"m{i}"] for i in range(50)] == stamps[1:]
    assert rdb.zcard(f"replay:{ROOM}") == 51


def test_async_view_replays_what_a_client_missed(replay_log: replaylog.ReplayLog) -> None:
    stamps = [replay_log.broadcast(ROOM, "chat", {"text": f"m{i}"}) for i in range(4)]

    async def main() -> None:
        client = AsyncClient()

        async def get(**params: Any) -> dict[str, Any]:
            response = await client.get(ASYNC_URL, params)
            assert response.status_code == 200
            return response.json()

        body = await get(since=stamps[1])
        assert [m["content"]["text"] for m in body["messages"]] == ["m2", "m3"]
        assert body["messages"] == replay_log.unspool(ROOM, stamps[1])
        assert body["complete"] is True and isinstance(body["epoch"], str)
        everything = await get()
        assert everything["messages"] == replay_log.unspool(ROOM, 0)
        assert everything["complete"] is True and everything["epoch"] == body["epoch"]
        assert (await get(since=stamps[3]))["messages"] == []
        # A client whose epoch is not the log's: its history is gone, the replay incomplete.
        assert (await get(since=stamps[1], epoch="another-history"))["complete"] is False
        assert (await client.get(ASYNC_URL, {"since": "yesterday"})).status_code == 400
        assert (await client.post(ASYNC_URL, {"author": "ann"})).status_code == 400
        assert (await client.put(ASYNC_URL)).status_code == 405

    asyncio.run(main())
    assert replay_log.unspool(ROOM, stamps[3]) == []  # the rejected POST broadcast nothing


def test_async_view_reports_an_incomplete_replay(
    replay_log: replaylog.ReplayLog, replaylog_url: str
) -> None:
    capped = replaylog.ReplayLog(replaylog_url, max_len=2)
    stamps = [capped.broadcast(ROOM, "chat", {"text": f"m{i}"}) for i in range(5)]
    capped.close()

    async def main() -> dict[str, Any]:
        response = await AsyncClient().get(ASYNC_URL, {"since": stamps[0]})
        assert response.status_code == 200
        return response.json()

    body = asyncio.run(main())
    assert body["complete"] is False
    assert [m["timestamp"] for m in body["messages"]] == stamps[3:]


def test_stream_view_sends_missed_then_live_messages(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    cursor = replay_log.broadcast(ROOM, "chat", {"text": "seen"})
    missed = [replay_log.broadcast(ROOM, "chat", {"text": f"missed-{i}"}) for i in range(2)]

    async def main() -> tuple[list[bytes], list[int]]:
        client = AsyncClient()
        response = await client.get(STREAM_URL, {"since": cursor, "n": 5})
        assert response.status_code == 200
        assert response["Content-Type"] == "text/event-stream"
        assert response.streaming and response.is_async
        chunks = response.streaming_content.__aiter__()
        first = await chunks.__anext__()  # the view subscribes when the stream starts
        assert first == b": subscribed\n\n"
        assert len(rdb.client_list(_type="pubsub")) == 1
        live = []
        for i in range(3):
            posted = await client.post(ASYNC_URL, {"text": f"live-{i}"})
            live.append(posted.json()["timestamp"])
        rest = [chunk async for chunk in chunks]  # ends by itself after n=5 messages
        await await_no_pubsub(rdb)  # the stream's end closed the subscription
        return [first, *rest], live

    chunks, live = asyncio.run(main())
    events = sse_events(chunks)
    assert events[0] == {"comment": "subscribed"}
    messages = [e["data"] for e in events[1:]]
    assert [e["id"] for e in events[1:]] == [str(m["timestamp"]) for m in messages]
    assert [m["timestamp"] for m in messages] == missed + live
    assert [m["content"]["text"] for m in messages] == [
        "missed-0", "missed-1", "live-0", "live-1", "live-2"
    ]  # fmt: skip
    assert messages == [{"channel": ROOM, **m} for m in replay_log.unspool(ROOM, cursor)]


def test_stream_view_reports_a_hole_it_cannot_fill(
    replay_log: replaylog.ReplayLog, replaylog_url: str, rdb: redis.Redis
) -> None:
    capped = replaylog.ReplayLog(replaylog_url, max_len=2)
    before = [capped.broadcast(ROOM, "chat", {"text": f"m{i}"}) for i in range(5)]
    capped.close()

    async def main() -> tuple[list[bytes], list[int]]:
        client = AsyncClient()
        bad = await client.get(STREAM_URL, {"since": "yesterday"})
        assert bad.status_code == 400
        response = await client.get(STREAM_URL, {"since": before[0], "n": 2})
        chunks = response.streaming_content.__aiter__()
        head = [await chunks.__anext__(), await chunks.__anext__()]
        after = [await replaylog.abroadcast(ROOM, "chat", {"text": f"a{i}"}) for i in range(2)]
        rest = [chunk async for chunk in chunks]
        await await_no_pubsub(rdb)
        return head + rest, after

    chunks, after = asyncio.run(main())
    subscribed, gap, *messages = sse_events(chunks)
    assert subscribed == {"comment": "subscribed"}
    assert gap == {"event": "incomplete", "data": {"channel": ROOM, "since": before[0]}}
    # After a hole the client reloads its state; the stream goes on from the newest message.
    assert [m["data"]["timestamp"] for m in messages] == after


# --- the app and its system checks --------------------------------------------------------------


def test_app_is_installed_with_its_checks() -> None:
    config = apps.get_app_config("replaylog")
    assert isinstance(config, ReplayLogConfig)
    assert config.name == "replaylog.django"
    assert checks.registry.registry.tag_exists("replaylog")


def test_checks_pass_on_good_settings() -> None:
    assert replaylog_errors() == []
    assert checks.run_checks(tags=["replaylog"]) == []
    out = io.StringIO()
    call_command("check", stdout=out)
    assert "no issues" in out.getvalue()
    good = {
        "REPLAYLOG_URL": "redis://user:pw@cache.example:6380/2",
        "EXPIRE_REPLAY_LOGS_MS": "3600000",
        "REPLAYLOG_CONNECT_TIMEOUT": 0.5,
        "REPLAYLOG_RESPONSE_TIMEOUT": "10",
        "REPLAYLOG_CHANNEL_PREFIX": "app:mq:",
        "REPLAYLOG_LOG_PREFIX": "app:replay:",
        "REPLAYLOG_META_PREFIX": "app:meta:",
        "REPLAYLOG_IDEMPOTENCY_PREFIX": "app:once:",
        "REPLAYLOG_MAX_LEN": "10000",
        "REPLAYLOG_CLUSTER_KEYS": "yes",
        "REPLAYLOG_IDEMPOTENCY_WINDOW_MS": 60_000,
    }
    with override_settings(**good):
        assert replaylog_errors() == []
    with override_settings(REPLAYLOG_URL="unix:///run/redis/redis.sock"):
        assert replaylog_errors() == []


def test_checks_accept_a_tls_url() -> None:
    # rediss:// is one of the three documented schemes: the runtime must accept it, not only the
    # settings converter.
    with override_settings(REPLAYLOG_URL="rediss://user:pw@cache.example:6380/2"):
        assert replaylog_errors() == []


MALFORMED = [
    ("EXPIRE_REPLAY_LOGS_MS", 0, "replaylog.E001"),
    ("EXPIRE_REPLAY_LOGS_MS", -60_000, "replaylog.E001"),
    ("EXPIRE_REPLAY_LOGS_MS", True, "replaylog.E001"),
    ("EXPIRE_REPLAY_LOGS_MS", "one hour", "replaylog.E001"),
    ("EXPIRE_REPLAY_LOGS_MS", 1.5, "replaylog.E001"),
    ("EXPIRE_REPLAY_LOGS_MS", None, "replaylog.E001"),
    ("REPLAYLOG_URL", "http://localhost:6379/0", "replaylog.E002"),
    ("REPLAYLOG_URL", "localhost:6379", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://localhost:99999/0", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://localhost:port/0", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://localhost:0/0", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://localhost:6379/db", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://", "replaylog.E002"),
    ("REPLAYLOG_URL", "unix://", "replaylog.E002"),
    ("REPLAYLOG_URL", 6379, "replaylog.E002"),
    ("REPLAYLOG_URL", "", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis://localhost:6379/0?protocol=resp9", "replaylog.E002"),
    ("REPLAYLOG_CONNECT_TIMEOUT", "fast", "replaylog.E003"),
    ("REPLAYLOG_CONNECT_TIMEOUT", 0, "replaylog.E003"),
    ("REPLAYLOG_CONNECT_TIMEOUT", True, "replaylog.E003"),
    ("REPLAYLOG_RESPONSE_TIMEOUT", None, "replaylog.E004"),
    ("REPLAYLOG_RESPONSE_TIMEOUT", -1, "replaylog.E004"),
    ("REPLAYLOG_CHANNEL_PREFIX", b"mq:", "replaylog.E005"),
    ("REPLAYLOG_CHANNEL_PREFIX", None, "replaylog.E005"),
    ("REPLAYLOG_LOG_PREFIX", 7, "replaylog.E006"),
    ("REPLAYLOG_META_PREFIX", ["replaymeta:"], "replaylog.E007"),
    ("REPLAYLOG_IDEMPOTENCY_PREFIX", None, "replaylog.E008"),
    ("REPLAYLOG_MAX_LEN", -1, "replaylog.E009"),
    ("REPLAYLOG_MAX_LEN", "lots", "replaylog.E009"),
    ("REPLAYLOG_CLUSTER_KEYS", "maybe", "replaylog.E010"),
    ("REPLAYLOG_IDEMPOTENCY_WINDOW_MS", 0, "replaylog.E011"),
    ("REPLAYLOG_BUSY_POLL_US", -1, "replaylog.E013"),
    ("REPLAYLOG_BUSY_POLL_US", 10_001, "replaylog.E013"),
    ("REPLAYLOG_BUSY_POLL_US", 1.5, "replaylog.E013"),
    ("REPLAYLOG_BUSY_POLL_US", True, "replaylog.E013"),
    ("REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES", 0, "replaylog.E014"),
    ("REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES", "8 MB", "replaylog.E014"),
    ("REPLAYLOG_SUBSCRIPTION_BUFFER_BYTES", True, "replaylog.E014"),
    ("REPLAYLOG_REPLAY_LIMIT", -1, "replaylog.E015"),
    ("REPLAYLOG_REPLAY_LIMIT", 1.5, "replaylog.E015"),
    ("REPLAYLOG_REPLAY_LIMIT", None, "replaylog.E015"),
    ("REPLAYLOG_MIN_REPLICAS", -1, "replaylog.E016"),
    ("REPLAYLOG_MIN_REPLICAS", "two", "replaylog.E016"),
    ("REPLAYLOG_REPLICA_TIMEOUT", 0, "replaylog.E017"),
    ("REPLAYLOG_SHARDED_PUBSUB", "maybe", "replaylog.E018"),
    ("REPLAYLOG_URL", "redis+sentinel://localhost:26379/0", "replaylog.E002"),
    ("REPLAYLOG_URL", "redis+cluster://localhost:7000?addr=nope", "replaylog.E002"),
]


def test_every_setting_has_a_check() -> None:
    # A setting added to replaylog without a check here would go unvalidated by `manage.py check`.
    assert set(CHECK_IDS) == set(replaylog_settings.SETTINGS)
    assert len(set(CHECK_IDS.values())) == len(CHECK_IDS)
    assert {name for name, _, _ in MALFORMED} == set(CHECK_IDS)


def test_settings_that_do_not_work_together_are_reported() -> None:
    with override_settings(REPLAYLOG_LOG_PREFIX="app:", REPLAYLOG_META_PREFIX="app:"):
        [error] = replaylog_errors()
    assert (error.id, error.level) == ("replaylog.E012", checks.ERROR)
    assert "prefix" in error.msg
    # Sharded pub/sub needs a cluster URL: the URL is what does not fit.
    with override_settings(REPLAYLOG_SHARDED_PUBSUB=True):
        [error] = replaylog_errors()
    assert error.id == "replaylog.E002" and "redis+cluster://" in error.msg
    cluster = "redis+cluster://localhost:7000?addr=localhost:7001"
    with override_settings(REPLAYLOG_SHARDED_PUBSUB=True, REPLAYLOG_URL=cluster):
        assert replaylog_errors() == []
    sentinel = "redis+sentinel://localhost:26379/0?sentinel_master_name=mymaster"
    with override_settings(REPLAYLOG_URL=sentinel):
        assert replaylog_errors() == []


@pytest.mark.parametrize(("name", "value", "check_id"), MALFORMED)
def test_checks_report_each_malformed_setting(name: str, value: Any, check_id: str) -> None:
    with override_settings(**{name: value}):
        [error] = replaylog_errors()
        assert (error.id, error.level, error.obj) == (check_id, checks.ERROR, name)
        assert name in error.msg
        assert f"settings.{name}" in error.hint
        with pytest.raises(SystemCheckError, match=check_id.replace(".", r"\.")):
            call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
    assert replaylog_errors() == []


def test_checks_report_every_malformed_setting_at_once() -> None:
    bad = {"EXPIRE_REPLAY_LOGS_MS": "soon", "REPLAYLOG_URL": "http://x", "REPLAYLOG_LOG_PREFIX": 1}
    with override_settings(**bad):
        ids = sorted(m.id for m in replaylog_errors())
    assert ids == ["replaylog.E001", "replaylog.E002", "replaylog.E006"]


def test_check_messages_never_show_the_password() -> None:
    with override_settings(REPLAYLOG_URL="http://user:s3cr3t@cache:6379/0"):
        [error] = replaylog_errors()
        assert error.id == "replaylog.E002"
        assert "s3cr3t" not in f"{error}{error.hint}"
    with override_settings(REPLAYLOG_URL="redis://user:s3cr3t@cache:port/0"):
        [error] = replaylog_errors()
        assert error.id == "replaylog.E002"
        assert "s3cr3t" not in f"{error}{error.hint}"


def test_checks_read_the_environment_when_django_does_not_set_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not hasattr(settings, "REPLAYLOG_RESPONSE_TIMEOUT")
    monkeypatch.setenv("REPLAYLOG_RESPONSE_TIMEOUT", "5 seconds")
    [error] = replaylog_errors()
    assert error.id == "replaylog.E004"
    assert "REPLAYLOG_RESPONSE_TIMEOUT" in error.hint and "environment" in error.hint


def test_empty_log_prefix_is_a_warning_not_an_error() -> None:
    with override_settings(REPLAYLOG_LOG_PREFIX=""):
        [warning] = replaylog_errors()
        assert (warning.id, warning.level) == ("replaylog.W001", checks.WARNING)
        out = io.StringIO()
        call_command("check", stdout=out, stderr=out)  # warnings do not fail the check
        assert "replaylog.W001" in out.getvalue()


def test_checks_do_not_connect_to_redis(replaylog_url: str, rdb: redis.Redis) -> None:
    def connections() -> int:
        return int(rdb.info("stats")["total_connections_received"])

    before = connections()
    with override_settings(REPLAYLOG_URL=replaylog_url):
        for _ in range(3):
            assert replaylog_errors() == []
        call_command("check", stdout=io.StringIO())
    assert connections() == before
    # Nor anywhere else: an unreachable server is no error for the checks.
    with override_settings(REPLAYLOG_URL="redis://127.0.0.1:1/0"):
        assert replaylog_errors() == []


def test_celery_autodiscovery_finds_the_prune_task() -> None:
    import sys

    from celery import Celery

    assert "replaylog.celery" not in sys.modules  # nothing above needed Celery
    app = Celery("djangoproject", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks(force=True)  # what a Django project's celery.py does
    assert "replaylog.django.tasks" in sys.modules
    assert app.tasks["replaylog.prune_replay_logs"].name == "replaylog.prune_replay_logs"
