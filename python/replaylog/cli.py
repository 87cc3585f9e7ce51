"""The ``replaylog`` command line: look at and act on the logs without writing Python.

``replaylog`` (console script), ``python -m replaylog`` and, in Django projects with
``"replaylog.django"`` installed, ``manage.py replaylog`` (reading Django settings). Errors are
one line on stderr with exit status 1; usage errors exit 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from . import IncompleteReplayError, ReplayLog, ReplayLogError


class CommandError(Exception):
    """A failure to report in one line."""


def main(argv: Sequence[str] | None = None, prog: str = "replaylog") -> int:
    """Runs the command line; returns the exit status."""
    args = _parser(prog).parse_args(argv)
    try:
        log = ReplayLog(args.url)
        return int(args.run(log, args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error, and nothing more to say.
        sys.stderr.close()
        return 0
    except (CommandError, ReplayLogError, ValueError, TypeError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Look at and act on replay logs.")
    parser.add_argument(
        "--url", help="the Redis URL (default: REPLAYLOG_URL, then redis://localhost:6379/0)"
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    tail = commands.add_parser("tail", help="print messages of channels, one JSON per line")
    tail.add_argument("channels", nargs="+", metavar="CHANNEL")
    tail.add_argument("--since", default="0", help="only messages after this timestamp")
    tail.add_argument("-f", "--follow", action="store_true", help="keep following live")
    tail.set_defaults(run=_tail)

    stats = commands.add_parser("stats", help="per channel: messages, ages, TTL, memory")
    stats.add_argument("pattern", nargs="?", help="a glob over channel names, e.g. 'room:*'")
    stats.add_argument("--json", action="store_true", help="one JSON object per channel")
    stats.set_defaults(run=_stats)

    prune = commands.add_parser("prune", help="trim entries older than the expiry")
    prune.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    prune.add_argument("--expire-ms", type=_positive_int, help="default: EXPIRE_REPLAY_LOGS_MS")
    prune.add_argument("--pattern", help="only channels matching this glob")
    prune.set_defaults(run=_prune)

    delete = commands.add_parser("delete", help="delete channels' logs")
    delete.add_argument("channels", nargs="+", metavar="CHANNEL")
    delete.set_defaults(run=_delete)

    broadcast = commands.add_parser("broadcast", help="publish and store one message")
    broadcast.add_argument("channel", metavar="CHANNEL")
    broadcast.add_argument("event_name", metavar="EVENT")
    broadcast.add_argument(
        "content", nargs="?", default="null", metavar="CONTENT_JSON", help="JSON, or - for stdin"
    )
    broadcast.set_defaults(run=_broadcast)

    replay = commands.add_parser("replay", help="messages after a cursor, and the verdict")
    replay.add_argument("channel", metavar="CHANNEL")
    replay.add_argument("--since", required=True, help="the client's cursor (a timestamp)")
    replay.add_argument("--epoch", help="the epoch the client last saw")
    replay.set_defaults(run=_replay)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _print_json(value: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(value) + "\n")
    out.flush()


def _tail(log: ReplayLog, args: argparse.Namespace) -> int:
    if not args.follow:
        messages = [
            {"channel": channel, **message}
            for channel, found in log.unspool_many(dict.fromkeys(args.channels, args.since)).items()
            for message in found
        ]
        for message in sorted(messages, key=lambda m: m["timestamp"]):
            _print_json(message)
        return 0
    since = float(args.since)  # a bad cursor fails here, before anything is printed
    with log.subscribe(args.channels, since=since) as subscription:
        try:
            while True:
                try:
                    for message in subscription:
                        _print_json(message)
                    return 0
                except IncompleteReplayError as gap:
                    print(f"replaylog: {gap}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            return 0


def _channel_of(log: ReplayLog, key: bytes) -> str:
    name = key.decode("utf-8", "surrogateescape")[len(log.log_prefix) :]
    if log.cluster_keys:
        name = name[3:] if name.startswith("{\0}") else name[1:-1]
    return name


def _logs(log: ReplayLog, pattern: str | None, **prune: Any) -> Iterator[tuple[int, list[Any]]]:
    """Every SCAN step's ``(redis_now_ms, logs)``; on a cluster, over every master."""
    position, now, logs = log._native.scan_logs(None, pattern, **prune)
    yield now, logs
    while position is not None:
        position, now, logs = log._native.scan_logs(position, pattern, **prune)
        yield now, logs


def _duration(ms: int) -> str:
    seconds = ms / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _stats(log: ReplayLog, args: argparse.Namespace) -> int:
    rows = []
    for now, logs in _logs(log, args.pattern):
        for key, count, oldest, newest, ttl_ms, memory in logs:
            rows.append(
                {
                    "channel": _channel_of(log, key),
                    "messages": count,
                    "oldest_age_ms": None if oldest is None else now - oldest,
                    "newest_age_ms": None if newest is None else now - newest,
                    "ttl_ms": None if ttl_ms < 0 else ttl_ms,
                    "memory_bytes": memory,
                }
            )
    rows.sort(key=lambda row: (-(row["memory_bytes"] or 0), row["channel"]))
    if args.json:
        for row in rows:
            _print_json(row)
        return 0
    table: list[tuple[str, ...]] = [("CHANNEL", "MESSAGES", "OLDEST", "NEWEST", "TTL", "MEMORY")]
    for row in rows:
        table.append(
            (
                row["channel"],
                str(row["messages"]),
                "-" if row["oldest_age_ms"] is None else _duration(row["oldest_age_ms"]),
                "-" if row["newest_age_ms"] is None else _duration(row["newest_age_ms"]),
                "-" if row["ttl_ms"] is None else _duration(row["ttl_ms"]),
                "-" if row["memory_bytes"] is None else str(row["memory_bytes"]),
            )
        )
    table = [tuple(_printable(cell) for cell in row) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for cells in table:
        line = cells[0].ljust(widths[0]) + "".join(
            "  " + cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])
        )
        print(line.rstrip())
    return 0


def _printable(text: str) -> str:
    """Control characters in a channel name, escaped: they must not garble the table."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _prune(log: ReplayLog, args: argparse.Namespace) -> int:
    expire_ms = args.expire_ms or log.expire_ms
    progress = sys.stderr.isatty()
    scanned = removed = 0
    touched = []
    for _, logs in _logs(log, args.pattern, expire_ms=expire_ms, dry_run=args.dry_run):
        for key, count, *_ in logs:
            scanned += 1
            removed += count
            if count:
                touched.append((_channel_of(log, key), count))
        if progress:
            print(f"\r{scanned} logs scanned, {removed} entries", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    for channel, count in touched:
        print(f"{_printable(channel)}\t{count}")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} entries older than {_duration(expire_ms)} from {scanned} logs")
    return 0


def _delete(log: ReplayLog, args: argparse.Namespace) -> int:
    for channel in args.channels:
        print(f"{_printable(channel)}\t{log.delete_log(channel)}")
    return 0


def _broadcast(log: ReplayLog, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.content == "-" else args.content
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"CONTENT_JSON is not JSON: {error}") from None
    print(log.broadcast(args.channel, args.event_name, content))
    return 0


def _replay(log: ReplayLog, args: argparse.Namespace) -> int:
    replay = log.replay(args.channel, args.since, epoch=args.epoch)
    for message in replay.messages:
        _print_json({"channel": args.channel, **message})
    verdict = {"complete": replay.complete, "epoch": replay.epoch}
    print(f"replaylog: {json.dumps(verdict)}", file=sys.stderr)
    if not replay.complete:
        print("replaylog: messages after the cursor are gone; reload the state", file=sys.stderr)
    return 0
