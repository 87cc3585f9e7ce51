"""What the reader does where jiter, which reads our JSON, stops: nesting past its own limit, and
the lone surrogate escapes that json.dumps (and our encoder) write."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

import replaylog
from replaylog._native import decode_json, encode_json


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


@pytest.mark.parametrize("depth", [199, 200, 201, 1000, 1001])
def test_nesting_up_to_the_envelope_around_1000_levels_is_read(depth: int) -> None:
    assert depth_of(decode_json("[" * depth + "]" * depth)) == depth


def test_nesting_past_it_is_left_to_json_loads() -> None:
    # Which, at Python's default recursion limit, cannot read it either.
    with pytest.raises(RecursionError):
        decode_json(b"[" * 1002 + b"]" * 1002)


@pytest.mark.parametrize(
    "content",
    ["lone \ud800 high", "lone \udfff low", {"key \udc80": ["\ud83d", "ok 😀"]}],
)
def test_lone_surrogates_read_as_json_loads_reads_them(rdb: redis.Redis, content: Any) -> None:
    encoded = encode_json(content)
    assert json.loads(encoded) == content
    assert decode_json(encoded) == content
    ts = replaylog.broadcast("surrogates", "e", content)
    assert replaylog.unspool("surrogates", ts - 1)[0]["content"] == content
