"""Reading a log in pages: a large replay never holds Redis for long, and says when it was cut.

The paging is written once, as a generator that asks for pages and is sent what they hold; a
sync and an async driver run it, so ``unspool`` and ``aunspool`` page the same way.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Generator
from typing import Any, Callable, NamedTuple

#: The most entries one request reads: Redis serves other clients between pages.
PAGE = 10_000

# The tail of a stored message, replaylog's compact form or the article's `json.dumps` form.
_TIMESTAMP_TAIL = re.compile(r'"timestamp": ?(-?\d+)}\s*$')


class Replay(NamedTuple):
    """What :meth:`ReplayLog.replay` returns."""

    messages: list[Any]
    """The messages after the cursor, oldest first, as :meth:`ReplayLog.unspool` gives them."""
    complete: bool
    """False when some message after the cursor was removed before it could be replayed."""
    epoch: str | None = None
    """Names this log's history; None for a log without replaylog's bookkeeping."""
    more: bool = False
    """True when ``limit`` cut the replay short: ask again from the last message's timestamp."""


#: One page request, ``(since, count, epoch)``, and what the page held: ``(complete, messages,
#: epoch)``, as the native ``replay`` returns it.
PageRequest = tuple[Any, int, "str | None"]
Page = tuple[bool, list[Any], "str | None"]
Pages = Generator[PageRequest, Page, Replay]


def check_limit(limit: Any, default: int) -> int:
    if limit is None:
        return default
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError("limit must be zero or more")
    return limit


def pages(since: Any, limit: int, epoch: str | None) -> Pages:
    """Asks for pages from ``since`` until ``limit`` messages or the end of the log.

    Each request asks for one message more than it may keep: that one tells whether more
    remain. Each page after the first goes on from the last timestamp read and is checked like
    the first, so a prune between pages reads as an incomplete replay, never as a silent gap.
    """
    messages: list[Any] = []
    complete = True
    while True:
        wanted = min(limit - len(messages), PAGE)
        page_complete, page, epoch = yield since, wanted + 1, epoch
        complete = complete and page_complete
        if len(page) <= wanted:
            return Replay(messages + page, complete, epoch, False)
        if len(messages) + wanted == limit:
            return Replay(messages + page[:wanted], complete, epoch, True)
        kept, since = _whole_milliseconds(page, wanted)
        if since is None:  # no timestamp to go on from (a foreign message): stop here
            return Replay(messages + page[:wanted], complete, epoch, True)
        messages += kept


def _whole_milliseconds(page: list[Any], wanted: int) -> tuple[list[Any], int | None]:
    """The first ``wanted`` messages of a page that holds one more, and the cursor to go on from.

    The article's code could store several messages in one millisecond (replaylog's never
    share one): those at the end of the page are left to the next one, which starts after a
    whole millisecond, so none is skipped.
    """
    probe = timestamp(page[wanted])
    end = wanted
    while end > 1 and timestamp(page[end - 1]) == probe:
        end -= 1
    if end == 1 and timestamp(page[0]) == probe:
        end = wanted  # one millisecond fills the page: nothing better to do
    return page[:end], timestamp(page[end - 1])


def timestamp(message: Any) -> int | None:
    """A message's timestamp: from a dict, or from the tail of a raw JSON string."""
    if isinstance(message, dict):
        value = message.get("timestamp")
        return value if isinstance(value, int) else None
    if isinstance(message, str):
        match = _TIMESTAMP_TAIL.search(message)
        return int(match.group(1)) if match else None
    return None


def run(pages: Pages, fetch: Callable[..., Page]) -> Replay:
    request = next(pages)
    while True:
        try:
            request = pages.send(fetch(*request))
        except StopIteration as done:
            return done.value


async def arun(pages: Pages, fetch: Callable[..., Awaitable[Page]]) -> Replay:
    request = next(pages)
    while True:
        try:
            request = pages.send(await fetch(*request))
        except StopIteration as done:
            return done.value
