"""What the article's algorithm loses, measured next to replaylog: ``python -m bench.flaws``.

Three workloads, each run on both implementations against one fresh redis-server:

- identical broadcasts in a tight loop: how many are kept;
- resuming from every cursor: how many messages a client that resumes right after each message
  it saw would never get;
- an app server whose clock is 30 s behind, broadcasting between two others: how many of its
  messages a client resuming from the last cursor it saw misses.
"""

from __future__ import annotations

import time
from typing import Any

from bench.impls import Article, Native
from bench.server import RedisServer

IDENTICAL = 20_000
RESUMES = 2_000
EXPIRE_MS = 3_600_000
SKEW_MS = 30_000


class SkewedArticle(Article):
    """The article's code on an app server whose clock runs behind."""

    def broadcast(self, channel: str, event_name: str, content: Any) -> int:
        real_time = time.time
        time.time = lambda: real_time() - SKEW_MS / 1000  # type: ignore[assignment]
        try:
            return super().broadcast(channel, event_name, content)
        finally:
            time.time = real_time  # type: ignore[assignment]


def kept_of_identical(impl: Any) -> int:
    for _ in range(IDENTICAL):
        impl.broadcast("identical", "ping", {"text": "same"})
    return len(impl.unspool("identical", 0))


def missed_on_resume(impl: Any) -> int:
    """Broadcast, and after each message resume from the cursor seen just before it."""
    missed = 0
    cursor = 0
    for index in range(RESUMES):
        impl.broadcast("resume", "tick", index)
        got = impl.unspool("resume", cursor)
        # Every message after the cursor, and this one in particular, must come back.
        if not got or got[-1]["content"] != index:
            missed += 1
        cursor = got[-1]["timestamp"] if got else cursor
    return missed


def missed_with_skew(first: Any, skewed: Any) -> int:
    """Servers A, B (30 s slow), C broadcast in turn; a client resumes after each of A's."""
    missed = 0
    for round_ in range(100):
        cursor = first.broadcast("skew", "a", round_)
        skewed.broadcast("skew", "b", round_)
        first.broadcast("skew", "c", round_)
        got = [m["event_name"] for m in first.unspool("skew", cursor)]
        missed += "b" not in got
    return missed


def main() -> None:
    rows = []
    with RedisServer() as server:
        article, native = Article(server.url, EXPIRE_MS), Native(server.url, EXPIRE_MS)
        for name, impl, skewed in (
            ("article", article, SkewedArticle(server.url, EXPIRE_MS)),
            ("replaylog", native, None),
        ):
            article.db.flushall()
            kept = kept_of_identical(impl)
            missed = missed_on_resume(impl)
            # replaylog takes the Redis clock, so an app server's skew cannot reach it.
            skew = missed_with_skew(impl, skewed or impl)
            rows.append((name, kept, missed, skew))
    print(f"{'':10} {'identical kept':>22} {'resumes that missed':>22} {'skewed msgs missed':>20}")
    for name, kept, missed, skew in rows:
        print(
            f"{name:10} {f'{kept:,} of {IDENTICAL:,}':>22} {f'{missed:,} of {RESUMES:,}':>22}"
            f" {f'{skew} of 100':>20}"
        )


if __name__ == "__main__":
    main()
