"""Each bad input raises the right exception and leaves Redis exactly as it was: no key changed,
nothing published."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
import redis
from conftest import PublishWatcher, last_json_line, redis_now_ms, run_python, snapshot

import replaylog


class Widget:
    pass


class Boom(Exception):
    pass


def raising_default(obj: Any) -> Any:
    raise Boom(f"cannot handle {type(obj).__name__}")


def circular_list() -> list:
    a: list = [1]
    a.append([a])
    return a


def circular_dict() -> dict:
    d: dict = {"x": 1}
    d["self"] = {"again": d}
    return d


CH = "victim"

# (id, channel, event_name, content, kwargs, expected exceptions, text the message must name)
BAD_BROADCASTS: list[tuple[str, Any, Any, Any, dict, Any, str | None]] = [
    ("channel-None", None, "e", 1, {}, TypeError, None),
    ("channel-int", 123, "e", 1, {}, TypeError, None),
    ("channel-list", ["victim"], "e", 1, {}, TypeError, None),
    ("event-None", CH, None, 1, {}, TypeError, None),
    ("event-int", CH, 5, 1, {}, TypeError, None),
    ("event-object", CH, object(), 1, {}, TypeError, None),
    ("content-object", CH, "e", object(), {}, TypeError, "object"),
    ("content-set", CH, "e", {1, 2}, {}, TypeError, "set"),
    ("content-bytes", CH, "e", b"bytes", {}, TypeError, "bytes"),
    ("content-complex", CH, "e", 1j, {}, TypeError, "complex"),
    ("content-class", CH, "e", Widget(), {}, TypeError, "Widget"),
    ("content-nested", CH, "e", {"a": [1, {"b": Widget()}]}, {}, TypeError, "Widget"),
    ("content-late", CH, "e", ["x" * 100_000, Widget()], {}, TypeError, "Widget"),
    ("key-tuple", CH, "e", {(1, 2): 1}, {}, TypeError, "tuple"),
    ("key-object", CH, "e", {"ok": 1, Widget(): 2}, {}, TypeError, "Widget"),
    ("nan", CH, "e", float("nan"), {}, ValueError, None),
    ("inf", CH, "e", float("inf"), {}, ValueError, None),
    ("-inf", CH, "e", float("-inf"), {}, ValueError, None),
    ("nested-nan", CH, "e", {"a": [1.5, {"b": float("nan")}]}, {}, ValueError, None),
    ("nan-after-data", CH, "e", [1] * 1000 + [float("inf")], {}, ValueError, None),
    ("circular-list", CH, "e", circular_list(), {}, ValueError, "Circular reference detected"),
    ("circular-dict", CH, "e", circular_dict(), {}, ValueError, "Circular reference detected"),
    ("default-raises", CH, "e", {"w": Widget()}, {"default": raising_default}, Boom, "Widget"),
    ("default-not-callable", CH, "e", Widget(), {"default": "nope"}, TypeError, None),
]


@pytest.fixture
def seeded(rdb: redis.Redis) -> redis.Redis:
    """The victim channel already holds a message, so "unchanged" compares something."""
    replaylog.broadcast(CH, "seed", {"seed": 1})
    rdb.set("unrelated", "value")
    return rdb


@pytest.mark.parametrize(
    "channel,event_name,content,kwargs,exc,names",
    [case[1:] for case in BAD_BROADCASTS],
    ids=[case[0] for case in BAD_BROADCASTS],
)
def test_bad_broadcast_raises_and_writes_nothing(
    seeded: redis.Redis,
    channel: Any,
    event_name: Any,
    content: Any,
    kwargs: dict,
    exc: Any,
    names: str | None,
) -> None:
    watcher = PublishWatcher(seeded)
    before = snapshot(seeded)
    with pytest.raises(exc) as info:
        replaylog.broadcast(channel, event_name, content, **kwargs)
    if names is not None:
        assert names in str(info.value)
    assert watcher.published() == []
    watcher.close()
    assert snapshot(seeded) == before
    # The log still works afterwards.
    ts = replaylog.broadcast(CH, "after", 2)
    assert [m["event_name"] for m in replaylog.unspool(CH, 0)] == ["seed", "after"]
    assert replaylog.unspool(CH, 0)[-1]["timestamp"] == ts


def test_bad_item_in_broadcast_many_writes_nothing(seeded: redis.Redis) -> None:
    watcher = PublishWatcher(seeded)
    before = snapshot(seeded)
    items = [(CH, "e", 1), ("other", "e", 2), (CH, "e", Widget()), (CH, "e", 3)]
    with pytest.raises(TypeError, match="Widget"):
        replaylog.broadcast_many(items)
    with pytest.raises(ValueError):
        replaylog.broadcast_many([(CH, "e", 1), (CH, "e", float("nan"))])
    with pytest.raises(TypeError, match="item 1: expected a .* tuple, got 2 items"):
        replaylog.broadcast_many([(CH, "e", 1), (CH, "e")])
    with pytest.raises(TypeError):
        replaylog.broadcast_many([(CH, "e", 1), (None, "e", 2)])
    assert watcher.published() == []
    watcher.close()
    assert snapshot(seeded) == before


BAD_UNSPOOLS: list[tuple[str, Any, Any, Any, Any]] = [
    ("channel-None", None, 0, None, TypeError),
    ("channel-int", 5, 0, None, TypeError),
    ("since-None", CH, None, None, TypeError),
    ("since-list", CH, [], None, TypeError),
    ("since-dict", CH, {}, None, TypeError),
    ("since-object", CH, object(), None, TypeError),
    ("since-word", CH, "yesterday", None, ValueError),
    ("since-empty", CH, "", None, ValueError),
    ("since-half-number", CH, "12abc", None, ValueError),
    ("since-nan", CH, float("nan"), None, ValueError),
    ("since-nan-text", CH, "nan", None, ValueError),
    ("limit-str", CH, 0, "5", TypeError),
    ("limit-float", CH, 0, 1.5, TypeError),
    ("limit-list", CH, 0, [], TypeError),
    ("limit-negative", CH, 0, -1, ValueError),
]


@pytest.mark.parametrize(
    "channel,since,limit,exc",
    [case[1:] for case in BAD_UNSPOOLS],
    ids=[case[0] for case in BAD_UNSPOOLS],
)
def test_bad_unspool_raises(
    seeded: redis.Redis, channel: Any, since: Any, limit: Any, exc: Any
) -> None:
    before = snapshot(seeded)
    with pytest.raises(exc):
        replaylog.unspool(channel, since, limit=limit)
    assert snapshot(seeded) == before
    assert [m["event_name"] for m in replaylog.unspool(CH, 0)] == ["seed"]


def test_bad_unspool_many_raises(seeded: redis.Redis) -> None:
    with pytest.raises(TypeError):
        replaylog.unspool_many([(CH, 0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since must be a numeric string"):
        replaylog.unspool_many({CH: "yesterday"})
    with pytest.raises(TypeError):
        replaylog.unspool_many({CH: None})  # type: ignore[dict-item]


@pytest.mark.parametrize("expire", ["soon", 0, -5, True, 1.5, [1]])
def test_bad_expiry_raises_and_prunes_nothing(seeded: redis.Redis, expire: Any) -> None:
    old = redis_now_ms(seeded) - 10 * 3_600_000
    seeded.zadd(
        f"replay:{CH}", {json.dumps({"event_name": "o", "content": 0, "timestamp": old}): old}
    )
    before = snapshot(seeded)
    with pytest.raises(replaylog.ConfigurationError, match="expire_ms must be a positive integer"):
        replaylog.prune_replay_logs(expire)
    assert snapshot(seeded) == before


@pytest.mark.parametrize(
    "where,value",
    [
        ("content", "lone \ud800 high"),
        ("content", "lone \udfff low"),
        ("content", {"key \udc80": ["\ud83d"]}),
        ("event_name", "ev\ud800"),
    ],
)
def test_lone_surrogates_in_content_and_event_names_are_escaped_like_json_dumps(
    seeded: redis.Redis, where: str, value: Any
) -> None:
    args = {"channel": "sur", "event_name": "e", "content": "c"}
    args[where] = value
    ts = replaylog.broadcast(args["channel"], args["event_name"], args["content"])
    assert isinstance(ts, int)
    (raw,) = replaylog.unspool("sur", 0, raw=True)
    # Escaped as \udXXX, as json.dumps writes them (and json.loads reads them back).
    assert json.dumps(args[where], separators=(",", ":")) in raw
    message = json.loads(raw)
    assert message["event_name"] == json.loads(json.dumps(args["event_name"]))
    assert message["content"] == json.loads(json.dumps(args["content"]))


def test_a_lone_surrogate_in_a_channel_name_is_rejected_and_writes_nothing(
    seeded: redis.Redis,
) -> None:
    # A channel names Redis keys, which are UTF-8: a lone surrogate has no UTF-8 form.
    watcher = PublishWatcher(seeded)
    before = snapshot(seeded)
    try:
        with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
            replaylog.broadcast("ch\ud800", "e", "c")
        assert watcher.published() == []
        assert snapshot(seeded) == before
    finally:
        watcher.close()


DEEP_SCRIPT = textwrap.dedent(
    """
    import json
    import replaylog
    from replaylog._native import decode_json, encode_json

    N = 200_000
    deep_list = []
    for _ in range(N):
        deep_list = [deep_list]
    deep_dict = {}
    for _ in range(N):
        deep_dict = {"k": deep_dict}

    def depth_ok(value):
        for _ in range(N):
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            else:
                return False
        return value == []

    results = {}
    for name, call in (
        ("broadcast-list", lambda: replaylog.broadcast("deep", "e", deep_list)),
        ("broadcast-dict", lambda: replaylog.broadcast("deep", "e", deep_dict)),
        ("encode-list", lambda: encode_json(deep_list)),
        ("encode-dict", lambda: encode_json(deep_dict)),
    ):
        try:
            call()
            results[name] = "no exception"
        except (ValueError, RecursionError) as exc:
            results[name] = type(exc).__name__

    for name, call in (("decode", lambda: decode_json("[" * N + "]" * N)),):
        try:
            value = call()
            results[name] = "correct" if depth_ok(value) else "wrong value"
        except (ValueError, RecursionError) as exc:
            results[name] = type(exc).__name__

    # Too deep to read: left out of the log's messages, which stay readable, and reported.
    results["unspool-legacy"] = replaylog.unspool("deep-legacy", 0)
    results["replay-complete"] = replaylog.replay("deep-legacy", 0).complete

    # The process is still healthy.
    ts = replaylog.broadcast("deep-after", "e", [[[1]]])
    results["after"] = replaylog.unspool("deep-after", 0)[0]["content"] == [[[1]]]
    print(json.dumps(results))
    """
)


def test_200000_levels_of_nesting_raise_without_crashing(
    rdb: redis.Redis, replaylog_url: str
) -> None:
    n = 200_000
    deep_member = '{"event_name": "e", "content": ' + "[" * n + "]" * n + ', "timestamp": 1}'
    rdb.zadd("replay:deep-legacy", {deep_member: 1})  # too deep to read, but no crash
    watcher = PublishWatcher(rdb)
    proc = run_python(DEEP_SCRIPT, env={"REPLAYLOG_URL": replaylog_url}, timeout=120)
    out = last_json_line(proc)
    published = watcher.published()
    watcher.close()

    # Past 1,000 levels: RecursionError to write, as json.dumps; the reader refuses with
    # ValueError, the error of any JSON it cannot read.
    for name in ("broadcast-list", "broadcast-dict", "encode-list", "encode-dict"):
        assert out[name] == "RecursionError", (name, out[name])
    assert out["decode"] == "ValueError"
    assert out["unspool-legacy"] == [] and out["replay-complete"] is False
    assert out["after"] is True
    assert rdb.exists("replay:deep") == 0
    assert [ch for ch, _ in published] == [b"mq:deep-after"]
