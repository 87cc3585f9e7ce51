"""pytest plugin (entry point ``pytest11``): a real redis-server for replaylog in users' suites.

Fixtures:

- ``replaylog_redis_proc``: a redis-server on a free loopback port, one per session, run by
  pytest-redis's ``RedisExecutor`` with pytest-redis's options.
- ``replaylog_url``: its ``redis://`` URL.
- ``replay_log``: a :class:`replaylog.ReplayLog` on that server, installed as the default log, so
  code under test that calls ``replaylog.broadcast`` writes there. Redis is flushed before each
  test.
  For the test's duration ``REPLAYLOG_URL`` points at that server in the environment and, when
  Django is configured, in Django settings too, so the default log rebuilt after an
  ``override_settings`` of another replaylog setting still uses the test server.
- ``replaylog_capture_on_commit``: ``with replaylog_capture_on_commit(execute=False,
  using="default") as broadcasts:`` lists the :class:`replaylog.django.PendingBroadcast` that
  the block scheduled with ``broadcast_on_commit``, once the block ends. It wraps Django's
  ``TestCase.captureOnCommitCallbacks`` (pytest-django's ``django_capture_on_commit_callbacks``),
  for tests whose transaction never commits (pytest-django's ``db``, ``TestCase``):
  ``execute=True`` runs them on the test server, as a commit would, and sets their
  ``timestamp``. :func:`replaylog.django.broadcasts_in` picks them out of the callbacks that
  Django's own capture lists.

Usage, in a Django project's tests::

    def test_say(client, replay_log):
        response = client.post("/rooms/lobby/messages/", {"text": "hi"})
        [message] = replay_log.unspool("lobby", 0)
        assert message["timestamp"] == response.json()["timestamp"]

    @pytest.mark.django_db
    def test_post(client, replay_log, replaylog_capture_on_commit):
        with replaylog_capture_on_commit(execute=True) as broadcasts:
            client.post("/rooms/lobby/posts/", {"text": "hi"})
        [sent] = broadcasts
        assert (sent.channel, sent.event_name) == ("lobby", "message.created")
        assert replay_log.unspool("lobby", 0)[0]["timestamp"] == sent.timestamp

The plugin needs the ``pytest`` extra (``pip install 'replaylog[pytest]'``, i.e. pytest-redis);
without it, pytest still runs and only these fixtures fail, with that hint.
Loading this plugin imports neither replaylog's native module, Django nor Celery.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    import replaylog
    from replaylog.django import PendingBroadcast

_pytest_redis_plugin: Any
try:
    import pytest_redis.plugin as _pytest_redis_plugin
except ImportError:  # pragma: no cover - exercised only without the extra
    _pytest_redis_plugin = None

_MISSING_EXTRA = "the replaylog pytest fixtures need pytest-redis: pip install 'replaylog[pytest]'"


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    # The server fixture reads pytest-redis's options (redis_exec, ...), so make sure its plugin
    # is registered even when entry points are not auto-loaded (PYTEST_DISABLE_PLUGIN_AUTOLOAD
    # with ``-p replaylog``). Registered under its entry point's name, so autoload skips it later.
    if _pytest_redis_plugin is None:
        return
    if not pluginmanager.is_registered(_pytest_redis_plugin) and not pluginmanager.has_plugin(
        "pytest_redis"
    ):
        pluginmanager.register(_pytest_redis_plugin, "pytest_redis")


@pytest.fixture(scope="session")
def replaylog_redis_proc(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A redis-server on a free loopback port for the session (a pytest-redis ``RedisExecutor``).

    It honours pytest-redis's options (``--redis-exec``, ``redis_host``, ``redis_port``, ...). Its
    files live in a short temporary directory unless ``--redis-datadir`` is given: pytest-redis's
    own factory puts the server's unix socket under pytest's basetemp, which overflows the 104/107
    byte socket path limit on macOS, in nested runs (pytester) and under long TMPDIRs. Idle clients
    are never disconnected by the server (``timeout 0``), as on a default production Redis.
    """
    if _pytest_redis_plugin is None:  # pragma: no cover - exercised only without the extra
        pytest.fail(_MISSING_EXTRA, pytrace=False)
    from mirakuru.exceptions import AlreadyRunning
    from port_for import get_port
    from pytest_redis.config import get_config
    from pytest_redis.executor import RedisExecutor

    config: Any = get_config(request)
    if isinstance(config, dict):  # pytest-redis 3.1, the last for Python 3.9: no port search
        config = SimpleNamespace(**config, port_search_count=1)
    datadir = Path(config.datadir) if config.datadir else None
    with tempfile.TemporaryDirectory(prefix="replaylog-redis-") as tmp:
        tried: set[int] = set()
        for _ in range(max(config.port_search_count, 1)):
            port = get_port(config.port or None, tried)
            assert port is not None
            tried.add(port)
            executor = RedisExecutor(
                executable=config.exec,
                databases=int(config.db_count),
                redis_timeout=0,
                loglevel=config.loglevel,
                host=config.host,
                port=port,
                username=config.username,
                password=config.password,
                save=config.save or "",
                rdbcompression=config.compression,
                rdbchecksum=config.rdbchecksum,
                syslog_enabled=config.syslog,
                datadir=datadir or Path(tmp),
                modules=config.modules,
                startup_timeout=60,
            )
            try:
                executor.start()
            except AlreadyRunning:  # another process took the port meanwhile
                continue
            try:
                yield executor
            finally:
                executor.stop()
            return
        raise RuntimeError(f"replaylog: no free port for redis-server (tried {sorted(tried)})")


@pytest.fixture
def replaylog_url(replaylog_redis_proc: Any) -> str:
    """The ``redis://`` URL of the session's test redis-server, database 0."""
    from urllib.parse import quote

    user = replaylog_redis_proc.username or ""
    password = replaylog_redis_proc.password
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{replaylog_redis_proc.host}:{replaylog_redis_proc.port}/0"


@pytest.fixture
def replay_log(replaylog_redis_proc: Any, replaylog_url: str) -> Iterator[replaylog.ReplayLog]:
    """A :class:`replaylog.ReplayLog` on a freshly flushed test server, installed as the default."""
    import redis

    import replaylog
    from replaylog import _settings

    # pytest-redis depends on redis-py, so the plugin may use it; replaylog itself does not.
    with redis.Redis.from_url(replaylog_url) as client:
        client.flushall()
    django_override = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLAYLOG_URL", replaylog_url)
        if _settings._django_settings() is not None:
            from django.test.utils import override_settings

            django_override = override_settings(REPLAYLOG_URL=replaylog_url)
            django_override.enable()
        try:
            # Built from the settings just pointed at the test server, so that a test's own
            # override_settings of a replaylog setting (the URL too) still applies.
            replaylog.reset_default()
            yield replaylog.get_default()
        finally:
            if django_override is not None:
                django_override.disable()
            replaylog.reset_default()


@pytest.fixture
def replaylog_capture_on_commit(
    replay_log: replaylog.ReplayLog,
) -> Callable[..., AbstractContextManager[list[PendingBroadcast]]]:
    """``with replaylog_capture_on_commit(execute=False, using="default") as broadcasts:``.

    At the end of the block, ``broadcasts`` lists the broadcasts scheduled in it with
    ``broadcast_on_commit`` on database ``using`` and still waiting for its commit, in order
    (Django's ``TestCase.captureOnCommitCallbacks``, filtered). ``execute=True`` runs them, on
    the test server (this fixture uses ``replay_log``), so their ``timestamp`` is set.
    """

    @contextmanager
    def capture(
        *, execute: bool = False, using: str = "default"
    ) -> Iterator[list[PendingBroadcast]]:
        from django.test import TestCase

        from replaylog.django import broadcasts_in

        broadcasts: list[PendingBroadcast] = []
        with TestCase.captureOnCommitCallbacks(using=using, execute=execute) as callbacks:
            yield broadcasts
        broadcasts.extend(broadcasts_in(callbacks))

    return capture
