"""The ``replaylog`` command line, run as an operator runs it: the console script,
``python -m replaylog`` and ``manage.py replaylog``, against the test redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import redis_now_ms

import replaylog

SCRIPT = str(Path(sys.executable).with_name("replaylog"))
HERE = Path(__file__).resolve().parent


def cli_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLAYLOG_", "DJANGO_"))}
    env["REPLAYLOG_URL"] = url
    return env


@pytest.fixture
def cli(replaylog_url: str) -> Any:
    def run(*args: str, stdin: str = "", command: tuple[str, ...] = (SCRIPT,)) -> Any:
        return subprocess.run(
            [*command, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(replaylog_url),
        )

    return run


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def assert_one_line_error(proc: Any, status: int = 1) -> None:
    """One line saying ``error:``; a usage error (exit 2) puts argparse's usage above it, as
    many lines as the terminal's width makes it."""
    assert proc.returncode == status, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    if status == 2:
        assert lines[0].startswith("usage: replaylog"), proc.stderr
        lines = [line for line in lines if "error:" in line]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr


def test_broadcast_then_tail(cli: Any, replay_log: replaylog.ReplayLog) -> None:
    first = cli("broadcast", "room:1", "chat", '{"text": "hi"}')
    assert first.returncode == 0, first.stderr
    second = cli("broadcast", "room:2", "chat", "-", stdin="[1, 2]")
    third = cli("broadcast", "room:1", "ping", command=(sys.executable, "-m", "replaylog"))
    stamps = [int(p.stdout) for p in (first, second, third)]
    assert [m["timestamp"] for m in replay_log.unspool("room:1")] == [stamps[0], stamps[2]]

    tail = cli("tail", "room:1", "room:2")
    assert tail.returncode == 0, tail.stderr
    messages = json_lines(tail.stdout)
    assert [(m["channel"], m["content"]) for m in messages] == [
        ("room:1", {"text": "hi"}),
        ("room:2", [1, 2]),
        ("room:1", None),
    ]
    since = json_lines(cli("tail", "room:1", "--since", str(stamps[0])).stdout)
    assert [m["timestamp"] for m in since] == [stamps[2]]


def test_tail_follow_is_gapless_and_ctrl_c_exits_zero(
    replaylog_url: str, replay_log: replaylog.ReplayLog
) -> None:
    before = replay_log.broadcast("f", "chat", "before")
    proc = subprocess.Popen(
        [SCRIPT, "tail", "-f", "f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(replaylog_url),
        # As from a terminal: a suite run in the background (`cmd &` in a script) ignores
        # SIGINT, and a child that inherits that would never see the Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["timestamp"] == before
        live = [replay_log.broadcast("f", "chat", i) for i in range(3)]
        assert [json.loads(proc.stdout.readline())["timestamp"] for _ in live] == live
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stderr == ""


def test_stats_table_and_json(cli: Any, replay_log: replaylog.ReplayLog, rdb: redis.Redis) -> None:
    for _ in range(3):
        replay_log.broadcast("big", "chat", "x" * 500)
    replay_log.broadcast("small", "chat", 1)
    replay_log.broadcast("other:1", "chat", 1)
    rdb.zadd("replay:old", {'{"timestamp":1}': redis_now_ms(rdb) - 7_200_000})

    rows = json_lines(cli("stats", "--json").stdout)
    by_channel = {row["channel"]: row for row in rows}
    assert set(by_channel) == {"big", "small", "other:1", "old"}
    assert by_channel["big"]["messages"] == 3
    assert rows[0]["channel"] == "big"  # the largest first
    assert by_channel["big"]["memory_bytes"] > by_channel["small"]["memory_bytes"] > 0
    assert 0 < by_channel["big"]["ttl_ms"] <= replay_log.expire_ms
    assert by_channel["old"]["ttl_ms"] is None
    assert by_channel["old"]["oldest_age_ms"] >= 7_200_000

    table = cli("stats", "o*").stdout.splitlines()
    assert table[0].split() == ["CHANNEL", "MESSAGES", "OLDEST", "NEWEST", "TTL", "MEMORY"]
    assert sorted(line.split()[0] for line in table[1:]) == ["old", "other:1"]
    old = next(line.split() for line in table[1:] if line.startswith("old"))
    assert old[2] == "2.0h" and old[4] == "-"


def test_prune_dry_run_then_prune(
    cli: Any, replay_log: replaylog.ReplayLog, rdb: redis.Redis
) -> None:
    now = redis_now_ms(rdb)
    for channel in ("a", "b"):
        rdb.zadd(
            f"replay:{channel}",
            {f'{{"n":{i},"timestamp":1}}': now - 7_200_000 + i for i in range(2)},
        )
        replay_log.broadcast(channel, "chat", "new")

    dry = cli("prune", "--dry-run", "--expire-ms", "3600000")
    assert dry.returncode == 0, dry.stderr
    assert sorted(dry.stdout.splitlines()[:-1]) == ["a\t2", "b\t2"]
    assert dry.stdout.splitlines()[-1].startswith("would remove 4 entries")
    assert rdb.zcard("replay:a") == rdb.zcard("replay:b") == 3

    only_a = cli("prune", "--expire-ms", "3600000", "--pattern", "a")
    assert only_a.stdout.splitlines() == ["a\t2", "removed 2 entries older than 1.0h from 1 logs"]
    assert (rdb.zcard("replay:a"), rdb.zcard("replay:b")) == (1, 3)
    everything = cli("prune")  # the default expiry (an hour)
    assert everything.stdout.splitlines()[-1].startswith("removed 2 entries")
    assert cli("prune").stdout.splitlines() == ["removed 0 entries older than 1.0h from 2 logs"]


def test_replay_prints_the_verdict_and_delete(cli: Any, replay_log: replaylog.ReplayLog) -> None:
    stamps = [replay_log.broadcast("r", "chat", i) for i in range(3)]
    replay = cli("replay", "r", "--since", str(stamps[0]))
    assert [m["timestamp"] for m in json_lines(replay.stdout)] == stamps[1:]
    assert '"complete": true' in replay.stderr

    assert cli("delete", "r").stdout == "r\t3\n"
    gone = cli("replay", "r", "--since", str(stamps[0]))
    assert gone.returncode == 0 and gone.stdout == ""
    assert '"complete": false' in gone.stderr and "reload" in gone.stderr


def test_errors_are_one_line_and_usage_errors_exit_2(
    cli: Any, replay_log: replaylog.ReplayLog, closed_port: int
) -> None:
    assert_one_line_error(cli("broadcast", "c", "e", "{not json"))
    assert replay_log.unspool("c") == []  # nothing written
    assert_one_line_error(cli("tail", "c", "--since", "yesterday"))
    assert_one_line_error(cli("tail", "-f", "c", "--since", "yesterday"))
    assert_one_line_error(cli("replay", "c", "--since", "nan"))
    unreachable = cli("--url", f"redis://127.0.0.1:{closed_port}/0", "stats")
    assert_one_line_error(unreachable)
    assert "127.0.0.1" in unreachable.stderr
    for usage in [(), ("nope",), ("tail",), ("prune", "--expire-ms", "-1"), ("replay", "c")]:
        assert_one_line_error(cli(*usage), status=2)


def test_manage_py_replaylog_reads_django_settings(replaylog_url: str) -> None:
    env = cli_env(replaylog_url)
    env["DJANGO_SETTINGS_MODULE"] = "djangoproject.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

    def manage(*args: str) -> Any:
        command = [sys.executable, "-m", "django", "replaylog", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    sent = manage("broadcast", "dj", "chat", '"hello"')
    assert sent.returncode == 0, sent.stderr
    [message] = json_lines(manage("tail", "dj").stdout)
    assert message["content"] == "hello" and message["timestamp"] == int(sent.stdout)
    bad = manage("tail", "dj", "--since", "x")
    assert_one_line_error(bad)
    assert " replaylog: error: since must be" in bad.stderr
