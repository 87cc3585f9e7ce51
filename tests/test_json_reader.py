"""What the reader does where jiter, which reads our JSON, stops: nesting past its own limit, and
the lone surrogate escapes that json.dumps (and our encoder) write."""

from __future__ import annotations

import json
from typing import Any

import pytest

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


def test_nesting_past_it_is_refused_as_invalid_json() -> None:
    with pytest.raises(ValueError, match="nested deeper than 1001 levels"):
        decode_json(b"[" * 1002 + b"]" * 1002)


@pytest.mark.parametrize(
    "content",
    ["lone \ud800 high", "lone \udfff low", {"key \udc80": ["\ud83d", "ok 😀"]}],
)
def test_lone_surrogates_are_read_by_json_loads(
    replay_log: replaylog.ReplayLog, content: Any
) -> None:
    encoded = encode_json(content)
    assert json.loads(encoded) == content
    with pytest.raises(ValueError, match="invalid JSON"):
        decode_json(encoded)  # jiter refuses them: the readers then call json.loads
    with replay_log.subscribe("surrogates", since=0) as live:
        ts = replay_log.broadcast("surrogates", "e", content)
        [message] = replay_log.unspool("surrogates", ts - 1)
        assert message["content"] == content
        delivered = live.get(timeout=10)
        assert delivered is not None and delivered["content"] == content
