"""JSON: what we store equals what json.dumps would give, shown by property tests and edge cases."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import math
import uuid
from typing import Any, Callable

import pytest
import redis
from conftest import stored_members
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replaylog
from replaylog._native import decode_json, encode_json


def canon(value: Any) -> Any:
    """A hashable form that tells int from float from bool, and ignores dict order."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((k, canon(v)) for k, v in value.items()))
    raise AssertionError(f"not a JSON value: {value!r}")


def expected(content: Any, **kwargs: Any) -> Any:
    return canon(json.loads(json.dumps(content, **kwargs)))


def stored_content(raw: str) -> Any:
    return json.loads(raw)["content"]


huge_ints = st.integers(min_value=-(2**256), max_value=2**256)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
keys = (
    st.text()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
)
json_like = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.lists(children, max_size=6).map(tuple)
        | st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=30,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=json_like)
def test_stored_content_equals_json_dumps(rdb: redis.Redis, content: Any) -> None:
    ts = replaylog.broadcast("prop", "e", content)
    (raw,) = replaylog.unspool("prop", ts - 1, raw=True)
    assert json.loads(raw)["timestamp"] == ts
    assert canon(stored_content(raw)) == expected(content)
    (msg,) = replaylog.unspool("prop", ts - 1)
    assert canon(msg["content"]) == expected(content)


@settings(max_examples=400, deadline=None)
@given(content=json_like)
def test_encode_json_equals_json_dumps(content: Any) -> None:
    encoded = encode_json(content)
    assert isinstance(encoded, bytes)
    assert canon(json.loads(encoded)) == expected(content)


@settings(max_examples=400, deadline=None)
@given(content=json_like)
def test_decode_json_equals_json_loads(content: Any) -> None:
    text = json.dumps(content)
    want = canon(json.loads(text))
    assert canon(decode_json(text)) == want
    assert canon(decode_json(text.encode("utf-8"))) == want
    pretty = json.dumps(content, indent=2, ensure_ascii=False)
    assert canon(decode_json(pretty)) == want


@pytest.mark.parametrize(
    "value",
    [
        2**200,
        -(2**100),
        2**64,
        2**63,
        -(2**63) - 1,
        10**400,
        0.1,
        1e16,
        1e300,
        5e-324,
        -0.0,
        1.7976931348623157e308,
        123456789.12345679,
        1.0,
        [2**200, {"n": -(2**100)}],
    ],
)
def test_numbers_round_trip_exactly(rdb: redis.Redis, value: Any) -> None:
    ts = replaylog.broadcast("num", "e", value)
    (msg,) = replaylog.unspool("num", ts - 1)
    assert canon(msg["content"]) == canon(value)
    assert msg["content"] == value
    assert canon(decode_json(json.dumps(value))) == canon(value)
    assert canon(json.loads(encode_json(value))) == canon(value)


class MyStr(str):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyDict(dict):
    pass


class MyList(list):
    pass


class Color(enum.IntEnum):
    RED = 1


class Mood(str, enum.Enum):
    HAPPY = "happy"


SPECIAL_CONTENT = [
    (1, "two", 3.0),
    {True: 1, False: 0, None: "n", 1.5: "f", 7: "i", 2**70: "big", -2.5: "z", 1e16: "e"},
    {"k": MyStr("s"), MyStr("key"): MyInt(5), "f": MyFloat(2.5)},
    MyDict(a=MyList([1, 2, MyDict(b=None)])),
    collections.OrderedDict([("z", 1), ("a", 2)]),
    {"color": Color.RED, Color.RED: "key", "mood": Mood.HAPPY},
    'control \x00 \x01 \x1f \u2028 \u2029 \\ " / \t\n',
    "emoji 😀 cjk 漢字 rtl עברית combining e\u0301",
    "",
    [],
    {},
    [[[[[]]]]],
]


@pytest.mark.parametrize("content", SPECIAL_CONTENT, ids=range(len(SPECIAL_CONTENT)))
def test_special_content_matches_json_dumps(rdb: redis.Redis, content: Any) -> None:
    ts = replaylog.broadcast("special", "e", content)
    ((raw, score),) = stored_members(rdb, "replay:special")
    assert score == ts
    assert canon(stored_content(raw)) == expected(content)
    assert canon(json.loads(encode_json(content))) == expected(content)


def test_non_string_keys_become_json_dumps_strings(rdb: redis.Redis) -> None:
    content = {True: 1, None: 2, 1.5: 3, 10: 4, 1e16: 5, 2**70: 6, 0.1: 7, -2.0: 8}
    replaylog.broadcast("keys", "e", content)
    (msg,) = replaylog.unspool("keys", 0)
    assert msg["content"] == json.loads(json.dumps(content))
    assert set(msg["content"]) == {
        "true",
        "null",
        "1.5",
        "10",
        "1e+16",
        str(2**70),
        "0.1",
        "-2.0",
    }


def test_event_name_is_encoded_like_content(rdb: redis.Redis) -> None:
    name = 'quote " backslash \\ newline \n emoji 😀'
    replaylog.broadcast("ev", name, 1)
    ((raw, _),) = stored_members(rdb, "replay:ev")
    assert json.loads(raw)["event_name"] == name
    assert replaylog.unspool("ev", 0)[0]["event_name"] == name


def _default(obj: Any) -> Any:
    if isinstance(obj, datetime.datetime):
        return obj.isoformat()
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, set):
        return {"set": sorted(obj)}  # returns something that again needs default for items
    raise TypeError(f"cannot encode {type(obj).__name__}")


DEFAULT_CONTENT = {
    "when": datetime.datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=datetime.timezone.utc),
    "amount": decimal.Decimal("12.3400"),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "tags": {decimal.Decimal("1.5"), decimal.Decimal("0.5")},
    "list": [uuid.UUID(int=1), 1, "x"],
}


def test_default_works_like_json_dumps(rdb: redis.Redis, replaylog_url: str) -> None:
    want = expected(DEFAULT_CONTENT, default=_default)
    replaylog.broadcast("dflt", "e", DEFAULT_CONTENT, default=_default)
    (msg,) = replaylog.unspool("dflt", 0)
    assert canon(msg["content"]) == want
    assert canon(json.loads(encode_json(DEFAULT_CONTENT, default=_default))) == want

    # A log-wide default, used when the call gives none.
    log = replaylog.ReplayLog(replaylog_url, default=_default)
    log.broadcast("dflt-log", "e", DEFAULT_CONTENT)
    assert canon(log.unspool("dflt-log", 0)[0]["content"]) == want
    log.close()


def test_default_is_not_called_for_native_types(rdb: redis.Redis) -> None:
    calls: list[Any] = []

    def default(obj: Any) -> Any:
        calls.append(obj)
        return "converted"

    content = {"a": [1, 2.5, "s", None, True, (1,), {"k": 2**90}]}
    replaylog.broadcast("dnative", "e", content, default=default)
    assert calls == []
    marker = object()
    replaylog.broadcast("dnative", "e", [marker], default=default)
    assert calls == [marker]
    assert [m["content"] for m in replaylog.unspool("dnative", 0)][1] == ["converted"]


def test_the_native_encoder_refuses_nan_and_infinities_that_json_dumps_writes() -> None:
    # Browsers' JSON.parse rejects NaN and Infinity: json.dumps writes them, we refuse them.
    for bad, written in [
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
        (-float("inf"), "-Infinity"),
        ([1, {"x": float("nan")}], '[1, {"x": NaN}]'),
    ]:
        assert json.dumps(bad) == written
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            encode_json(bad)


def test_the_native_helpers_refuse_what_json_refuses_and_read_what_json_loads_reads() -> None:
    with pytest.raises(TypeError, match="Widget"):
        encode_json({"w": Widget()})
    with pytest.raises(ValueError):
        decode_json("{")
    with pytest.raises(ValueError):
        decode_json("[1, 2")
    with pytest.raises(ValueError):
        decode_json(b"\xff\xfe not utf-8")
    assert decode_json("123456789012345678901234567890") == 123456789012345678901234567890
    assert isinstance(decode_json("1.0"), float)
    assert decode_json('"\\ud83d\\ude00"') == "😀"
    assert math.copysign(1.0, decode_json("-0.0")) == -1.0


class Widget:
    pass


class HidesSecret(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return [(k, v) for k, v in super().items() if k != "secret"]


class Reversed(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        return list(super().items())[::-1]


def stored_content_pairs(replay_log: replaylog.ReplayLog, channel: str) -> Any:
    [raw] = replay_log.unspool(channel, raw=True)
    return json.loads(raw, object_pairs_hook=list)[1][1]  # ("content", <pairs>)


@pytest.mark.parametrize(
    "content",
    [
        HidesSecret(a=1, secret="s3cret", b={"n": HidesSecret(secret=1, x=2)}),
        [HidesSecret(secret=True)],
        {"outer": HidesSecret(keep=1, secret=2)},
        Reversed(a=1, b=2, c=3),
    ],
    ids=["hidden-key", "in-list", "in-dict", "reordered"],
)
def test_dict_subclasses_are_encoded_through_items_like_json_dumps(
    replay_log: replaylog.ReplayLog, content: Any
) -> None:
    replay_log.broadcast("sub", "e", content)
    [message] = replay_log.unspool("sub")
    assert message["content"] == json.loads(json.dumps(content))
    assert "s3cret" not in replay_log.unspool("sub", raw=True)[0]
    expected_pairs = json.loads(json.dumps(content), object_pairs_hook=list)
    assert stored_content_pairs(replay_log, "sub") == expected_pairs


def test_an_ordered_dict_after_move_to_end_keeps_json_dumps_order(
    replay_log: replaylog.ReplayLog,
) -> None:
    ordered = collections.OrderedDict(a=1, b=2, c=3, d=4)
    ordered.move_to_end("a")
    ordered.move_to_end("c", last=False)
    nested = collections.OrderedDict(x=1, y=2)
    nested.move_to_end("x")
    ordered["d"] = nested
    assert list(ordered) != list(dict.__iter__(ordered))  # the dict's own order differs
    replay_log.broadcast("od", "e", ordered)
    pairs = stored_content_pairs(replay_log, "od")
    assert pairs == json.loads(json.dumps(ordered), object_pairs_hook=list)
    assert [key for key, _ in pairs] == ["c", "b", "d", "a"]
    assert pairs[2][1] == [("y", 2), ("x", 1)]


def is_panic(error: BaseException) -> bool:
    return type(error).__name__ == "PanicException"


class Opaque:
    """Something only ``default`` can encode."""


def grow(target: dict[str, Any]) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        target[f"added-{len(target)}"] = 1
        return "encoded"

    return default


def shrink(target: dict[str, Any]) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        target.pop("z", None)
        return "encoded"

    return default


@pytest.mark.parametrize("mutation", [grow, shrink], ids=["grow", "shrink"])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("many", [False, True], ids=["broadcast", "broadcast_many"])
def test_a_default_that_mutates_the_dict_being_written_gets_its_items_as_they_were(
    replay_log: replaylog.ReplayLog,
    mutation: Callable[[dict[str, Any]], Callable[[Any], Any]],
    nested: bool,
    many: bool,
) -> None:
    """A ``default`` that changes the dict being written: no PanicException (a BaseException
    that ``except Exception`` misses), and the dict's items as they were when its writing
    began, as ``json.dumps`` gives them before Python 3.12 (later ones write the items they
    find as they go)."""

    def make() -> tuple[dict[str, Any], Any]:
        target: dict[str, Any] = {"a": Opaque(), "b": 1, "z": 2}
        return target, ({"outer": [target]} if nested else target)

    _, unchanged = make()
    expected = json.loads(json.dumps(unchanged, default=lambda value: "encoded"))
    target, content = make()
    try:
        if many:
            replay_log.broadcast_many(
                [("m", "e", 1), ("m", "e", content)], default=mutation(target)
            )
        else:
            replay_log.broadcast("m", "e", content, default=mutation(target))
    except BaseException as error:
        assert not is_panic(error), f"a PanicException escaped: {error!r}"
        raise
    assert replay_log.unspool("m")[-1]["content"] == expected
