"""Celery integration: the ``replaylog.prune_replay_logs`` task and the README's beat_schedule.

The main test runs a real ``celery worker`` (solo pool) in a subprocess, with its broker and result
backend on the test redis-server, and sends it the task by name, as Celery beat would.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.beat import Scheduler
from conftest import redis_now_ms

import replaylog
import replaylog.celery
from replaylog.celery import TASK_NAME

BEAT_ENTRY = "prune-replay-logs"


def beat_snippet() -> str:
    """The ```python block of replaylog/celery.py's docstring, read without importing the module."""
    spec = importlib.util.find_spec("replaylog.celery")
    assert spec is not None and spec.origin is not None
    docstring = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    assert docstring is not None
    match = re.search(r"```python\n(.*?)```", docstring, re.S)
    assert match, "replaylog/celery.py's docstring has no ```python block"
    return match.group(1)


def seed(r: redis.Redis, channel: str, ages_ms: list[int]) -> list[bytes]:
    """Entries as the article's broadcast stored them, ``age`` ms old by the Redis clock."""
    now = redis_now_ms(r)
    members = []
    for age in ages_ms:
        member = json.dumps({"event_name": "e", "content": age, "timestamp": now - age})
        r.zadd(f"replay:{channel}", {member: now - age})
        members.append(member.encode())
    return members


@pytest.fixture
def rdb(replaylog_redis_proc: Any) -> Iterator[redis.Redis]:
    with redis.Redis(host=replaylog_redis_proc.host, port=replaylog_redis_proc.port) as r:
        yield r


def test_importing_replaylog_imports_neither_django_nor_celery() -> None:
    code = textwrap.dedent(
        """
        import sys
        import replaylog, replaylog.pytest_plugin, replaylog.django
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("django", "celery", "kombu"))
        assert not bad, bad
        import replaylog.celery
        assert "celery" in sys.modules  # the check above can see an import
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_task_is_a_shared_task_with_its_explicit_name() -> None:
    assert TASK_NAME == "replaylog.prune_replay_logs"
    app = Celery("replaylog-names", set_as_current=False)
    app.finalize()
    task = app.tasks[TASK_NAME]
    assert task.name == TASK_NAME
    assert task.max_retries == 0
    assert task.ignore_result is False
    assert replaylog.celery.prune_replay_logs.name == TASK_NAME


def test_beat_snippet_is_valid() -> None:
    app = Celery("replaylog-beat", set_as_current=False)
    exec(compile(beat_snippet(), "replaylog/celery.py docstring", "exec"), {"app": app})
    assert "replaylog.celery" in app.conf.imports
    app.loader.import_default_modules()
    app.finalize()

    schedule = app.conf.beat_schedule
    assert list(schedule) == [BEAT_ENTRY]
    assert schedule[BEAT_ENTRY]["task"] in app.tasks
    # Celery beat itself accepts the entry.
    entry = Scheduler(app, lazy=False).schedule[BEAT_ENTRY]
    assert entry.task == TASK_NAME
    assert entry.schedule.run_every == timedelta(seconds=60)
    assert 0 < entry.options["expires"] < 60


def test_eager_task_prunes_and_returns_the_count(
    replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    app = Celery("replaylog-eager", set_as_current=False)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = True
    seed(rdb, "room-1", [120_000, 90_000, 5_000])
    kept = seed(rdb, "room-2", [200_000, 1_000])[1:]

    result = app.tasks[TASK_NAME].apply_async(kwargs={"expire_ms": 60_000})

    assert result.get() == 3
    assert [m["content"] for m in replay_log.unspool("room-1", 0)] == [5_000]
    assert rdb.zrange("replay:room-2", 0, -1) == kept
    assert app.tasks[TASK_NAME].apply_async(kwargs={"expire_ms": 60_000}).get() == 0


WORKER_APP = '''
"""The Celery app of the test worker; its beat_schedule comes from the README snippet."""
import ast, importlib.util, os, re
from pathlib import Path

from celery import Celery

app = Celery("replaylog-worker", broker=os.environ["TEST_BROKER_URL"],
             backend=os.environ["TEST_BACKEND_URL"])
app.conf.worker_hijack_root_logger = False
# Without this snippet the worker would not know the task: nothing else imports replaylog.celery.
_origin = importlib.util.find_spec("replaylog.celery").origin
_doc = ast.get_docstring(ast.parse(Path(_origin).read_text(encoding="utf-8")))
exec(re.search(r"```python\\n(.*?)```", _doc, re.S).group(1), {"app": app})
'''


@pytest.fixture
def worker(
    replay_log: replaylog.ReplayLog,
    replaylog_redis_proc: Any,
    replaylog_url: str,
    tmp_path: Path,
) -> Iterator[tuple[Celery, Path]]:
    """A real ``celery worker`` (solo pool) on the test server; yields (client app, log file)."""
    base = f"redis://{replaylog_redis_proc.host}:{replaylog_redis_proc.port}"
    (tmp_path / "worker_app.py").write_text(WORKER_APP, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        TEST_BROKER_URL=f"{base}/1",
        TEST_BACKEND_URL=f"{base}/2",
        REPLAYLOG_URL=replaylog_url,
        EXPIRE_REPLAY_LOGS_MS="60000",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "worker_app", "worker",
                "--pool=solo", "--concurrency=1", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--loglevel=INFO", "--hostname=replaylog-test@%h",
            ],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    app = Celery("replaylog-client", broker=f"{base}/1", backend=f"{base}/2", set_as_current=False)
    exec(compile(beat_snippet(), "replaylog/celery.py docstring", "exec"), {"app": app})
    try:
        yield app, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()


def test_real_worker_runs_the_task_sent_by_name_and_by_beat(
    worker: tuple[Celery, Path], replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    app, log_path = worker

    def get(result: Any) -> Any:
        try:
            return result.get(timeout=90)
        except Exception as exc:
            raise AssertionError(f"{exc!r}\nworker log:\n{log_path.read_text()}") from exc

    seed(rdb, "room-1", [300_000, 120_000, 61_000])
    kept = seed(rdb, "room-1", [20_000, 1_000])
    seed(rdb, "room-2", [90_000])
    fresh = replaylog.broadcast("room-2", "chat", "fresh")

    # By name, as another service would send it; the worker reads EXPIRE_REPLAY_LOGS_MS=60000.
    assert get(app.send_task(TASK_NAME)) == 4
    assert rdb.zrange("replay:room-1", 0, -1) == kept
    assert [m["timestamp"] for m in replay_log.unspool("room-2", 0)] == [fresh]

    # As Celery beat sends it, from the README's beat_schedule entry.
    seed(rdb, "room-3", [100_000, 70_000])
    scheduler = Scheduler(app, lazy=False)
    result = scheduler.apply_async(scheduler.schedule[BEAT_ENTRY])
    assert get(result) == 2
    assert rdb.exists("replay:room-3") == 0  # Redis deletes a sorted set left empty

    # Arguments reach the task.
    assert get(app.send_task(TASK_NAME, kwargs={"expire_ms": 1})) == 3
    assert replay_log.unspool("room-1", 0) == [] and replay_log.unspool("room-2", 0) == []
    worker_log = log_path.read_text()
    assert TASK_NAME in worker_log and "succeeded" in worker_log, worker_log
