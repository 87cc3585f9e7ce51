"""N subscriptions opened directly in Python, in one process, for ``python -m bench.fanout``.

``python -m bench.subscribers URL CLIENTS MESSAGES`` opens and closes one subscription (so
that imports and connections are made), prints ``warm`` and waits for a line on stdin. Then it
opens CLIENTS ``asubscribe()`` on the ``fanout`` channel and prints ``ready``. Each reads until
it has MESSAGES ``tick`` messages; a line on stdin ends the wait early. Then it prints one line
of JSON, per client ``[[seq, latency_ns, ...], resets]`` (seq and latency alternate), and
exits at the end of stdin, so that its CPU and memory can be read while it still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

import replaylog
from bench.fanout import CHANNEL, DUPLICATE_GRACE_S, raise_open_files_limit


class Consumer:
    """One subscription's reader: the seq and latency of each message, and its resets."""

    def __init__(self, messages: int, finished: asyncio.Event, counter: list[int]) -> None:
        self.deliveries: list[int] = []
        self.resets = 0
        self.messages = messages
        self.finished = finished
        self.unfinished = counter

    async def read(self, subscription: replaylog.AsyncSubscription) -> None:
        received = 0
        while True:
            try:
                message = await subscription.get()
            except replaylog.IncompleteReplayError:
                self.resets += 1
                continue
            if message is None:
                return
            content = message["content"]
            self.deliveries += (content["seq"], time.time_ns() - content["sent_ns"])
            received += 1
            if received == self.messages:
                self.unfinished[0] -= 1
                if self.unfinished[0] == 0:
                    self.finished.set()


async def run(url: str, clients: int, messages: int) -> None:
    raise_open_files_limit()
    log = replaylog.ReplayLog(url)
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    unfinished = [clients]
    consumers = [Consumer(messages, finished, unfinished) for _ in range(clients)]
    async with log.asubscribe(CHANNEL):
        pass
    print("warm", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    async with contextlib.AsyncExitStack() as stack:
        subscriptions = [
            await stack.enter_async_context(log.asubscribe(CHANNEL)) for _ in range(clients)
        ]
        readers = [
            asyncio.ensure_future(consumer.read(subscription))
            for consumer, subscription in zip(consumers, subscriptions)
        ]
        print("ready", flush=True)
        stop_line = loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.wait(
            [asyncio.ensure_future(finished.wait()), stop_line],
            return_when=asyncio.FIRST_COMPLETED,
        )
        await asyncio.sleep(DUPLICATE_GRACE_S)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        results = [[consumer.deliveries, consumer.resets] for consumer in consumers]
        print(json.dumps(results), flush=True)
        await stop_line
        # Measured while the subscriptions are still open; now stdin's end lets go.
        await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    url, clients, messages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    asyncio.run(run(url, clients, messages))


if __name__ == "__main__":
    main()
