"""Cluster-ready keys: with ``cluster_keys=True`` every key a broadcast creates sits in the log
key's Redis Cluster hash slot, computed here with CRC16 as the Redis Cluster spec does; the
default layout stays the article's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import replaylog


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT as XMODEM: poly 0x1021, init 0, no reflection, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of ``key``: the hash tag rule, then CRC16 mod 16384."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end != -1 and end != start + 1:
            key = key[start + 1 : end]
    return crc16_xmodem(key) % 16384


# Channel names: arbitrary text, weighted towards the characters that matter here.
channels = st.text(
    alphabet=st.one_of(
        st.sampled_from("{}:{}{}::ab"),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=20,
)


# --------------------------------------------------------------------------- the slot function


def test_crc16_known_vectors() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert crc16_xmodem(b"") == 0
    assert crc16_xmodem(b"A") == 0x58E5
    # Slots the Redis Cluster documentation and clients agree on.
    assert key_slot(b"foo") == 12182
    assert key_slot(b"bar") == 5061
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")


@pytest.fixture
def cluster_node(redis_server_factory: Any, tmp_path: Path) -> redis.Redis:
    # The bus port is set explicitly: by default it is the port + 10000, which a free port
    # above 55535 cannot have.
    server = redis_server_factory(
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(tmp_path / "nodes.conf"),
        "--cluster-port",
        str(free_port()),
    )
    client = server.client()
    yield client
    client.close()


def test_slot_function_agrees_with_cluster_keyslot(cluster_node: redis.Redis) -> None:
    keys = [
        b"",
        b"foo",
        b"123456789",
        b"{}",
        b"{}x",
        b"x{}",
        b"{{}}",
        b"a{b}c",
        b"a{b{c}d}",
        b"a}b{c",
        b"replay:{room:1}",
        b"replaymeta:{room:1}",
        b"replayonce:6:{room:1}:k",
        "replay:{комната}".encode(),
        "replay:{\U0001f600}".encode(),
        bytes(range(1, 256)),
    ]
    for key in keys:
        assert key_slot(key) == cluster_node.execute_command("CLUSTER", "KEYSLOT", key), key


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(channels, min_size=1, max_size=10), st.text(max_size=10))
def test_slot_function_agrees_with_cluster_keyslot_on_arbitrary_keys(
    cluster_node: redis.Redis, parts: list[str], glue: str
) -> None:
    key = glue.join(parts).encode("utf-8", "surrogatepass")
    assert key_slot(key) == cluster_node.execute_command("CLUSTER", "KEYSLOT", key)


# --------------------------------------------------------------------------- the layouts


@pytest.mark.parametrize("channel", ["}", "}room", "", "{}"])
def test_channels_that_would_make_an_empty_hash_tag_still_share_one_slot(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis, channel: str
) -> None:
    """``replay:{}room}`` has an empty hash tag, so Redis hashes the whole key and the log,
    its bookkeeping and its idempotency keys would land in different slots."""
    log = replaylog.ReplayLog(replaylog_url, cluster_keys=True)
    log.broadcast(channel, "e", 1, idempotency_key="k")
    created = rdb.keys("*")
    assert len(created) == 4  # the log, its bookkeeping, the idempotency key, the mark
    assert len({key_slot(k) for k in created}) == 1, created


def test_default_layout_is_the_articles(replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    replay_log.broadcast("room:1", "e", 1, idempotency_key="k")
    assert sorted(rdb.keys("*")) == sorted(
        [b"replay:room:1", b"replaymeta:room:1", b"replayonce:6:room:1:k", b"replayonce:w:room:1"]
    )
    assert rdb.type("replay:room:1") == b"zset"


def test_cluster_layout_key_names(
    replaylog_url: str, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    log = replaylog.ReplayLog(replaylog_url, cluster_keys=True)
    ts = log.broadcast("room:1", "e", 1, idempotency_key="k")
    assert sorted(rdb.keys("*")) == sorted(
        [
            b"replay:{room:1}",
            b"replaymeta:{room:1}",
            b"replayonce:6:{room:1}:k",
            b"replayonce:w:{room:1}",
        ]
    )
    slots = {key_slot(k) for k in rdb.keys("*")}
    assert slots == {key_slot(b"room:1")}
    # Everything else works on the tagged layout: unspool, replay, prune, subscribe.
    assert [m["timestamp"] for m in log.unspool("room:1", 0)] == [ts]
    assert log.replay("room:1", 0).complete is True
    assert log.broadcast("room:1", "e", 1, idempotency_key="k") == ts
    assert log.prune_replay_logs(expire_ms=60_000) == 0
    with log.subscribe("room:1", since=0) as sub:
        assert sub.get(timeout=5)["timestamp"] == ts


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(channel=channels, key=st.text(min_size=1, max_size=12))
@example(channel="room:1", key="k")
@example(channel="a{b}c", key="{x}")
@example(channel="}", key="k")
@example(channel="", key="k")
@example(channel="{", key="}")
def test_every_key_of_a_broadcast_shares_the_log_keys_slot(
    replaylog_url: str,
    replay_log: replaylog.ReplayLog,
    rdb: redis.Redis,
    channel: str,
    key: str,
) -> None:
    rdb.flushall()
    log = replaylog.ReplayLog(replaylog_url, cluster_keys=True, max_len=2)
    for _ in range(3):  # enough to trim, so every code path has run
        log.broadcast(channel, "e", {"c": channel}, idempotency_key=key)
        log.broadcast(channel, "e", {"c": channel})
    created = set(rdb.keys("*"))
    # The log, its bookkeeping, the idempotency key and the writing master's mark: nothing else.
    assert len(created) == 4
    [log_key] = [k for k in created if rdb.type(k) == b"zset"]
    assert log_key.startswith(b"replay:")
    assert sum(k.startswith(b"replaymeta:") for k in created) == 1
    assert sum(k.startswith(b"replayonce:w:") for k in created) == 1
    assert sum(k.startswith(b"replayonce:") for k in created) == 2
    assert [m["content"] for m in log.unspool(channel, 0)] == [{"c": channel}] * 2
    slot = key_slot(log_key)
    for created_key in created:
        assert key_slot(created_key) == slot, (created_key, log_key)
