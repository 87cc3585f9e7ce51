"""A password in the URL never shows, whatever form the URL takes; input errors say what is wrong
and, in a batch, which item."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from conftest import PublishWatcher, free_port, last_json_line, run_python, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import exception_chain

import replaylog

# --------------------------------------------------------------------------- passwords

# A socket path where nothing listens.
SOCKET = "/nonexistent/replaylog.sock"

# Every form of URL redis-rs reads a password from (and a few it does not, which replaylog must
# mask all the same), as templates over {password}, {port} (closed) and {socket}. redis-rs reads
# the userinfo of a TCP URL, ending it at the first "/", "?" or "#" (so "redis://:a/b@host/0"
# does not parse, and "redis://user:1/b@host/0" is host "user" with path "/b@host/0"), and the
# "pass" parameter of a unix one.
USERINFO_FORMS = [
    "redis://:{password}@127.0.0.1:{port}/0",
    "redis://:{password}@127.0.0.1:{port}",
    "redis://someone:{password}@127.0.0.1:{port}/0?protocol=resp3",
    "rediss://:{password}@127.0.0.1:{port}/0#insecure",
    "rediss://someone:{password}@127.0.0.1:{port}",
    "redis://:{password}@[::1]:{port}/0",
    "redis://someone:{password}@localhost:{port}",
    "unix://:{password}@localhost{socket}",
    # redis-rs reads these, replaylog refuses them:
    "valkey://:{password}@127.0.0.1:{port}/0",
    "REDIS://:{password}@127.0.0.1:{port}/0",
    # Malformed:
    "redis:/:{password}@127.0.0.1:{port}/0",
    "redis://:{password}@127.0.0.1:{port}/zero",
    "http://:{password}@127.0.0.1:{port}/0",
]
QUERY_FORMS = [
    "redis://127.0.0.1:{port}?password={password}",
    "redis://127.0.0.1:{port}/0?pass={password}",
    "rediss://127.0.0.1:{port}/0?password={password}#insecure",
    "unix://{socket}?pass={password}",
    "redis+unix://{socket}?db=0&pass={password}&protocol=resp3",
    "unix://{socket}?PASS={password}&db=1",
    "redis+unix://{socket}?pa%73s={password}",
    # redis-rs reads this, replaylog refuses it:
    "unix:{socket}?pass={password}",
    # Malformed:
    "redis+unix://{socket}?pass={password}&protocol=9",
]
# Characters a URL gives a meaning to, and some it does not, to put in passwords unencoded.
SPECIAL = "/?#@:&=%+ ;,$!'()*[]~\\|^`{}\"<>é＠／"
PIECES = ("Hunter2x", "S3cretQ")


def url_forms(password: str, port: int) -> Iterator[str]:
    """URLs of each form with ``password``: unencoded where the form allows it, and encoded."""
    fill = {"port": port, "socket": SOCKET}
    encoded = quote(password, safe="")
    for form in USERINFO_FORMS:
        yield form.format(password=password, **fill)
        yield form.format(password=encoded, **fill)
    for form in QUERY_FORMS:
        # In a query, an unencoded "&" ends the value for every parser: what follows is not it.
        if "&" not in password:
            yield form.format(password=password, **fill)
        yield form.format(password=encoded, **fill)


def exception_texts(exc: BaseException) -> Iterator[str]:
    for e in exception_chain(exc):
        yield from (str(e), repr(e), repr(e.args))


def texts_about(url: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """All replaylog says about a log on ``url``: its repr and url, the error of a call (nothing
    listens there) or of building it (a refused URL), and the error of a bad setting beside it;
    and through REPLAYLOG_URL, the default log's repr or the error of building it."""
    texts: list[str] = []
    try:
        log = replaylog.ReplayLog(url, connect_timeout=0.5, response_timeout=0.5)
    except replaylog.ConfigurationError as e:
        texts.extend(exception_texts(e))
    else:
        texts += [repr(log), log.url]
        with pytest.raises(replaylog.ConnectionError) as info:
            log.broadcast("ch", "e", 1)
        texts.extend(exception_texts(info.value))
        log.close()
    with pytest.raises(replaylog.ConfigurationError) as bad_setting:
        replaylog.ReplayLog(url, connect_timeout=-1)
    texts.extend(exception_texts(bad_setting.value))

    monkeypatch.setenv("REPLAYLOG_URL", url)
    replaylog.reset_default()
    try:
        texts.append(repr(replaylog.get_default()))
    except replaylog.ConfigurationError as e:
        texts.extend(exception_texts(e))
    finally:
        replaylog.reset_default()
    return texts


def assert_hidden(pieces: tuple[str, ...], url: str, texts: list[str]) -> None:
    for text in texts:
        for piece in pieces:
            assert piece not in text, f"password shown for {url!r}: {text}"


@pytest.mark.parametrize("separator", [*"/?#@:&＠", "://"])
def test_a_password_never_shows_whatever_the_url_form(
    separator: str, closed_port: int, clean_default: pytest.MonkeyPatch
) -> None:
    password = separator.join(PIECES)
    for url in url_forms(password, closed_port):
        assert_hidden(PIECES, url, texts_about(url, clean_default))


def test_the_reported_urls_never_show_their_password(
    closed_port: int, clean_default: pytest.MonkeyPatch
) -> None:
    # The two shapes the issue reported: a query with no path, and an unencoded "/".
    # The first parses and finds nothing listening; the second does not parse.
    for url, pieces, error in [
        (
            f"redis://127.0.0.1:{closed_port}?password=hunter2secret",
            ("hunter2secret",),
            replaylog.ConnectionError,
        ),
        (
            f"redis://:hunter2/secret@127.0.0.1:{closed_port}/0",
            ("hunter2", "secret"),
            replaylog.ConfigurationError,
        ),
    ]:
        assert_hidden(pieces, url, texts_about(url, clean_default))
        # Through the environment, also the error of a call.
        clean_default.setenv("REPLAYLOG_URL", url)
        clean_default.setenv("REPLAYLOG_CONNECT_TIMEOUT", "0.5")
        replaylog.reset_default()
        with pytest.raises(error) as info:
            replaylog.broadcast("ch", "e", 1)
        assert_hidden(pieces, url, list(exception_texts(info.value)))


def test_masked_urls_keep_everything_but_the_password() -> None:
    log = replaylog.ReplayLog(
        "rediss://someone:pw@[::1]:6380/2?protocol=resp3&password=pw2#insecure"
    )
    assert log.url == "rediss://someone:***@[::1]:6380/2?protocol=resp3&password=***#insecure"
    log.close()
    log = replaylog.ReplayLog("unix:///run/redis.sock?db=3&pass=pw&user=someone")
    assert log.url == "unix:///run/redis.sock?db=3&pass=***&user=someone"
    log.close()
    # redis-rs reads "/secret@host/0" as the path of host "user"; whoever wrote it, as the
    # password's rest. Neither reading may show.
    with pytest.raises(replaylog.ConfigurationError) as info:
        replaylog.ReplayLog("redis://user:hunter2/secret@host/0")
    assert "redis://user:***@host/0" in str(info.value)


password_pieces = st.lists(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=4, max_size=8).map("Qz".__add__),
    min_size=1,
    max_size=4,
)
password_separators = st.text(SPECIAL + "\t", max_size=3)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_no_generated_password_ever_shows(
    closed_port: int, clean_default: pytest.MonkeyPatch, data: st.DataObject
) -> None:
    pieces = tuple(data.draw(password_pieces))
    between = data.draw(
        st.lists(password_separators, min_size=len(pieces) + 1, max_size=len(pieces) + 1)
    )
    password = between[0] + "".join(p + s for p, s in zip(pieces, between[1:]))
    url = data.draw(st.sampled_from(list(url_forms(password, closed_port))))
    assert_hidden(pieces, url, texts_about(url, clean_default))


def test_django_checks_never_show_the_password() -> None:
    # Python's urlsplit, which the checks use, refuses a host part with characters that NFKC
    # turns into "@" or "/", and says so quoting it.
    urls = [
        url for separator in "/?#@:＠／" for url in url_forms(separator.join(PIECES), free_port())
    ]
    proc = run_python(
        textwrap.dedent(
            """
            import json, os, sys
            import django
            from django.conf import settings
            settings.configure()
            django.setup()
            from replaylog.django.checks import check_settings
            shown = []
            for url in json.loads(sys.stdin.read()):
                os.environ["REPLAYLOG_URL"] = url
                try:
                    shown += [f"{m.msg} {m.hint}" for m in check_settings()]
                except Exception as e:
                    shown += [f"{type(e).__name__}: {e!r}"]
            print(json.dumps(shown))
            """
        ),
        stdin=json.dumps(urls),
    )
    shown = last_json_line(proc)
    assert shown, "the checks found nothing wrong with any URL"
    assert_hidden(PIECES, "any", shown)


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("channels", [b"room", bytearray(b"room"), memoryview(b"room"), None, 42])
def test_subscribe_says_what_channels_must_be(
    replay_log: replaylog.ReplayLog, channels: Any
) -> None:
    message = rf"^channels must be a str or an iterable of str, not {type(channels).__name__}$"
    with pytest.raises(TypeError, match=message):
        replay_log.subscribe(channels)
    with pytest.raises(TypeError, match=message):
        replay_log.asubscribe(channels)
    with pytest.raises(TypeError, match=message):
        replaylog.subscribe(channels)


class Widget:
    pass


def circular_list() -> list[Any]:
    items: list[Any] = [1]
    items.append([items])
    return items


@pytest.mark.parametrize(
    "content, error",
    [
        (float("nan"), ValueError),
        (Widget(), TypeError),
        ({1j: 1}, TypeError),
        (circular_list(), ValueError),
    ],
)
def test_broadcast_many_names_the_item_of_a_json_error(
    replay_log: replaylog.ReplayLog,
    rdb: redis.Redis,
    watcher: PublishWatcher,
    content: Any,
    error: type[Exception],
) -> None:
    before = snapshot(rdb)
    with pytest.raises(error) as alone:
        replay_log.broadcast("ch", "e", content)
    expected = f"^{re.escape(f'broadcast_many item 2: {alone.value}')}$"
    items = [("ch", "e", 1), ("ch", "e", 2), ("ch", "e", content), ("ch", "e", 3)]
    with pytest.raises(error, match=expected):
        replay_log.broadcast_many(items)
    with pytest.raises(error, match=expected):
        asyncio.run(replay_log.abroadcast_many(items))
    with pytest.raises(error, match=expected):
        replaylog.broadcast_many(items)
    assert watcher.published() == []
    assert snapshot(rdb) == before


class Refusal(Exception):
    pass


def refusing_default(obj: Any) -> Any:
    raise Refusal("not this one")


def test_broadcast_many_names_the_item_of_a_shape_error_once(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    before = snapshot(rdb)
    for item, message in [
        (("ch", "e"), r"expected a \(channel, event_name, content\) tuple, got 2 items"),
        (["ch", "e", 1], r"expected a \(channel, event_name, content\) tuple, not list"),
        ((None, "e", 1), "channel must be str, not NoneType"),
        (("ch", 5, 1), "event_name must be str, not int"),
    ]:
        with pytest.raises(TypeError, match=rf"^broadcast_many item 1: {message}$"):
            replay_log.broadcast_many([("ch", "e", 0), item])
    assert snapshot(rdb) == before
    # What a default raises is the caller's own: it passes unchanged.
    with pytest.raises(Refusal, match="^not this one$"):
        replay_log.broadcast_many([("ch", "e", 0), ("ch", "e", Widget())], default=refusing_default)
    assert snapshot(rdb) == before
