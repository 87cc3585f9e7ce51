"""The workloads: each returns seconds per message (or per channel, for prune)."""

from __future__ import annotations

import marshal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.payload import EVENT_NAME, chat_messages


@dataclass
class Sizes:
    broadcast: int  # calls per repetition, one thread
    threads: int
    per_thread: int  # calls per thread per repetition
    many: int  # messages in one broadcast_many
    unspool: int  # messages in the unspooled log
    channels: int  # logs to prune
    per_channel: int  # entries per log, half of them expired
    repeat: int  # best of this many repetitions
    ping_requests: int  # redis-benchmark PING requests
    ceiling_requests: int  # redis-benchmark EVALSHA requests


FULL = Sizes(10_000, 8, 2_000, 10_000, 10_000, 20_000, 4, 5, 20_000, 200_000)
SMOKE = Sizes(50, 8, 10, 50, 50, 200, 4, 1, 1_000, 2_000)

EXPIRE_MS = 3_600_000


@dataclass
class Stall:
    ping_max_ms: float = 0.0
    pings: int = 0
    latency_max_ms: float | None = None  # from LATENCY LATEST, None if unavailable
    latency_events: dict[str, int] = field(default_factory=dict)

    @property
    def worst_ms(self) -> float:
        return max(self.ping_max_ms, self.latency_max_ms or 0.0)


def best(samples: list[float]) -> float:
    return min(samples)


def broadcast_one_thread(impl: Any, contents: list[Any], channel: str) -> float:
    broadcast = impl.broadcast
    start = time.perf_counter()
    for content in contents:
        broadcast(channel, EVENT_NAME, content)
    return (time.perf_counter() - start) / len(contents)


def broadcast_threads(impl: Any, contents: list[Any], threads: int, channel: str) -> float:
    """All threads start together on one shared client; wall time per message."""

    def broadcasts(own: str) -> None:
        for content in contents:
            impl.broadcast(own, EVENT_NAME, content)

    return in_threads(broadcasts, threads, channel) / (threads * len(contents))


def empty_calls_threads(impl: Any, calls: int, threads: int, channel: str) -> float:
    """Like ``broadcast_threads`` with unspools of a missing log, which cost Redis about 1 µs:
    what the threads cost the client before any work; wall time per call."""

    def unspools(own: str) -> None:
        for _ in range(calls):
            impl.unspool(own, 0)

    return in_threads(unspools, threads, channel) / (threads * calls)


def in_threads(work_on: Any, threads: int, channel: str) -> float:
    """Wall seconds for ``threads`` threads, released together, each running
    ``work_on(own channel)``."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        own = f"{channel}:{index}"
        barrier.wait()
        try:
            work_on(own)
        except BaseException as error:  # reported after the join
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def broadcast_many(impl: Any, items: list[tuple[str, str, Any]]) -> float:
    start = time.perf_counter()
    timestamps = impl.broadcast_many(items)
    elapsed = time.perf_counter() - start
    if len(timestamps) != len(items):
        raise AssertionError(f"{impl.name}: broadcast_many returned {len(timestamps)} timestamps")
    return elapsed / len(items)


def unspool(impl: Any, channel: str, expected: int, raw: bool) -> float:
    read = impl.unspool_raw if raw else impl.unspool
    start = time.perf_counter()
    messages = read(channel, 0)
    elapsed = time.perf_counter() - start
    if len(messages) != expected:
        raise AssertionError(f"{impl.name}: unspooled {len(messages)} of {expected} messages")
    return elapsed / expected


def reply_bytes(admin: redis.Redis, command: list[str], repeat: int) -> float:
    """Best seconds for Redis to answer ``command`` on a plain socket, read but not parsed:
    Redis plus loopback, what no client can beat."""
    replies = admin.execute_command(*command)
    size = len(f"*{len(replies)}\r\n") + sum(
        len(f"${len(reply)}\r\n") + len(reply) + 2 for reply in replies
    )
    kwargs = admin.connection_pool.connection_kwargs
    buffer = memoryview(bytearray(size))
    samples = []
    with socket.create_connection((kwargs["host"], kwargs["port"])) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kwargs.get("db"):
            sock.sendall(resp_command(["SELECT", str(kwargs["db"])]))
            sock.recv(16)
        request = resp_command(command)
        for _ in range(repeat):
            start = time.perf_counter()
            sock.sendall(request)
            received = 0
            while received < size:
                received += sock.recv_into(buffer[received:], size - received)
            samples.append(time.perf_counter() - start)
    return best(samples)


def resp_command(parts: list[str]) -> bytes:
    """One command in RESP, as a client sends it."""
    encoded = [part.encode() for part in parts]
    return b"".join(
        [f"*{len(encoded)}\r\n".encode()]
        + [b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded]
    )


def unmarshal(objects: Any, repeat: int) -> float:
    """Best seconds for ``marshal.loads`` to recreate ``objects``: CPython's fastest built-in
    deserializer, with no text to parse, so about what creating the objects alone costs."""
    data = marshal.dumps(objects)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        marshal.loads(data)
        samples.append(time.perf_counter() - start)
    return best(samples)


def fill(impl: Any, channel: str, count: int, chunk: int = 10_000) -> None:
    """Writes ``count`` messages through the implementation's own batch path."""
    for start in range(0, count, chunk):
        contents = chat_messages(min(chunk, count - start), start)
        impl.broadcast_many([(channel, EVENT_NAME, content) for content in contents])


def fill_for_prune(admin: redis.Redis, channels: int, per_channel: int) -> int:
    """``channels`` logs, each with ``per_channel`` entries, the older half past expiry.

    Written directly with scores in the past. Returns how many entries a prune should remove.
    """
    seconds, micros = admin.time()
    now = seconds * 1000 + micros // 1000
    template = (
        '{"event_name":"message","content":{"id":%d,"room":"general-engineering",'
        '"user":{"id":48213,"name":"Ada Lovelace",'
        '"avatar":"https://cdn.example.com/avatars/48213/3f2a9c1e-64.png"},'
        '"text":"Deploy is green on staging; rolling to prod at 14:30 unless someone objects.",'
        '"mentions":[],"edited":false,"reply_to":null,"reactions":3},"timestamp":%d}'
    )
    expired = per_channel // 2
    pipe = admin.pipeline(transaction=False)
    for index in range(channels):
        members = {}
        for entry in range(per_channel):
            if entry < expired:
                score = now - EXPIRE_MS - 60_000 - entry * 1000
            else:
                score = now - 60_000 + entry * 1000
            members[template % (index * per_channel + entry, score)] = score
        pipe.zadd(f"replay:room-{index}", members)
        # The bookkeeping replaylog's broadcast keeps beside each log.
        newest = max(members.values())
        # "base top fresh", as src/lua/broadcast.lua writes it.
        pipe.set(f"replaymeta:room-{index}", f"{min(members.values())} {newest} 1")
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    return channels * expired


class PingLoop:
    """PINGs Redis from its own connection in a thread and keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, single_connection_client=True)
        self.client.ping()
        self.stop = threading.Event()
        self.max_ms = 0.0
        self.count = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        ping = self.client.ping
        clock = time.perf_counter
        while not self.stop.is_set():
            start = clock()
            ping()
            took = (clock() - start) * 1000
            self.count += 1
            if took > self.max_ms:
                self.max_ms = took
            time.sleep(0.0002)

    def __enter__(self) -> PingLoop:
        self.thread.start()
        time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.01)
        self.stop.set()
        self.thread.join()
        self.client.close()


def latency_reset(admin: redis.Redis) -> bool:
    try:
        admin.config_set("latency-monitor-threshold", 1)
        admin.execute_command("LATENCY", "RESET")
        return True
    except redis.ResponseError:
        return False


def latency_latest(admin: redis.Redis) -> dict[str, int]:
    """{event: max ms} from LATENCY LATEST."""
    events = {}
    for entry in admin.execute_command("LATENCY", "LATEST"):
        name = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
        events[name] = int(entry[3])
    return events


def prune_with_stall(impl: Any, admin: redis.Redis, url: str) -> tuple[float, int, Stall]:
    monitored = latency_reset(admin)
    with PingLoop(url) as loop:
        start = time.perf_counter()
        removed = impl.prune()
        elapsed = time.perf_counter() - start
    stall = Stall(ping_max_ms=loop.max_ms, pings=loop.count)
    if monitored:
        stall.latency_events = latency_latest(admin)
        stall.latency_max_ms = float(max(stall.latency_events.values(), default=0))
    return elapsed, removed, stall


def prune_timed(impl: Any) -> tuple[float, int]:
    start = time.perf_counter()
    removed = impl.prune()
    return time.perf_counter() - start, removed


def commandstats(admin: redis.Redis) -> dict[str, dict[str, float]]:
    return {
        name[len("cmdstat_") :]: stats
        for name, stats in admin.info("commandstats").items()
        if name.startswith("cmdstat_")
    }
