"""The pytest plugin, used by a user's suite in its own pytest process.

The user's suite declares nothing: the fixtures come from the ``pytest11`` entry point of the
installed package.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_SUITE = """
import os

import redis

import replaylog

SEEN = {}


def client(proc):
    return redis.Redis(host=proc.host, port=proc.port)


def test_broadcast_arrives(replay_log, replaylog_url, replaylog_redis_proc):
    assert replaylog.get_default() is replay_log
    assert replaylog_url == f"redis://{replaylog_redis_proc.host}:{replaylog_redis_proc.port}/0"
    assert os.environ["REPLAYLOG_URL"] == replaylog_url  # for subprocesses the test starts
    with client(replaylog_redis_proc) as r:
        assert int(r.info("server")["tcp_port"]) == replaylog_redis_proc.port  # a real server
        pubsub = r.pubsub()
        pubsub.subscribe("mq:room-1")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        timestamp = replaylog.broadcast("room-1", "chat", {"text": "hi"})
        live = pubsub.get_message(timeout=5)
        pubsub.close()
        r.set("stray-key", "left behind by this test")
    expected = {"event_name": "chat", "content": {"text": "hi"}, "timestamp": timestamp}
    assert replay_log.unspool("room-1", 0) == [expected]
    assert live is not None and live["channel"] == b"mq:room-1"
    SEEN["port"] = replaylog_redis_proc.port


def test_redis_is_clean_for_the_next_test(replay_log, replaylog_redis_proc):
    assert replaylog_redis_proc.port == SEEN["port"]  # one server for the session
    assert replay_log.unspool("room-1", 0) == []
    with client(replaylog_redis_proc) as r:
        assert r.dbsize() == 0


def test_environment_is_restored_after_the_fixture():
    assert os.environ["REPLAYLOG_URL"] == "redis://127.0.0.1:1/0"
"""


def test_user_suite_uses_the_fixtures_through_the_entry_point(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    monkeypatch.setenv("REPLAYLOG_URL", "redis://127.0.0.1:1/0")
    pytester.makepyfile(test_user_suite=USER_SUITE)

    result = pytester.runpytest_subprocess("-v")

    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_broadcast_arrives PASSED*"])


def test_plugin_works_without_entry_point_autoload(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only replaylog's plugin is named: it brings pytest-redis's options and process factory itself.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    monkeypatch.setenv("REPLAYLOG_URL", "redis://127.0.0.1:1/0")
    pytester.makepyfile(test_user_suite=USER_SUITE)

    result = pytester.runpytest_subprocess("-p", "replaylog.pytest_plugin", "-v")

    result.assert_outcomes(passed=3)


def test_a_failing_user_test_is_reported_as_failed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixture must not swallow a user's failure, and teardown must still reset the default.
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.makepyfile(
        test_failing="""
        import replaylog

        def test_wrong_expectation(replay_log):
            replaylog.broadcast("room-1", "chat", "x")
            assert replay_log.unspool("room-1", 0) == []

        def test_default_was_reset(replay_log):
            assert replaylog.unspool("room-1", 0) == []
        """
    )

    result = pytester.runpytest_subprocess()

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_wrong_expectation*"])


def test_fixtures_follow_pytest_redis_options(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A password-protected test server: the URL carries it, flushing and broadcasting work, and the
    # log's repr hides it. The datadir option is honoured too.
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    datadir = pytester.mkdir("redis-data")
    pytester.makepyfile(
        test_options=f"""
        import os
        import redis
        import replaylog

        def test_password(replay_log, replaylog_url, replaylog_redis_proc):
            assert replaylog_url.startswith("redis://:s3cr%2Ft@127.0.0.1:")
            with redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port) as r:
                try:
                    r.ping()
                except redis.AuthenticationError:
                    pass
                else:
                    raise AssertionError("the server should require the password")
            timestamp = replaylog.broadcast("room-1", "chat", "hi")
            assert [m["timestamp"] for m in replay_log.unspool("room-1", 0)] == [timestamp]
            assert "s3cr" not in repr(replay_log)
            assert os.path.exists(os.path.join({str(datadir)!r}, "redis.%d.sock" % replaylog_redis_proc.port))
        """  # noqa: E501
    )

    result = pytester.runpytest_subprocess("--redis-password=s3cr/t", f"--redis-datadir={datadir}")

    result.assert_outcomes(passed=1)
