"""The workloads: each returns the wall and CPU seconds per message (or per channel, for prune)."""

from __future__ import annotations

import marshal
import multiprocessing
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import redis

from bench.impls import BROADCAST_LUA, Peer, make
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
    processes: int  # worker processes broadcasting at once
    per_process: int  # calls per process per repetition
    sporadic_rounds: int  # rounds of sporadic calls; each implementation gets a block per round
    sporadic_per_round: int  # calls per block, each after its own pause


FULL = Sizes(10_000, 8, 2_000, 10_000, 10_000, 20_000, 4, 5, 20_000, 200_000, 4, 2_000, 5, 30)
SMOKE = Sizes(50, 8, 10, 50, 50, 200, 4, 1, 1_000, 2_000, 4, 10, 1, 3)

# Pauses before each sporadic call, in seconds: a Django worker's requests are rarely back to back.
SPORADIC_PAUSE = (0.020, 0.200)

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


@dataclass(frozen=True)
class Cost:
    """Seconds per unit: wall time, and the client's CPU time (user + system, all the threads of
    the process or processes that made the calls; Redis's own CPU is not in it)."""

    wall: float
    cpu: float

    def per(self, units: int) -> Cost:
        return Cost(self.wall / units, self.cpu / units)


class Stopwatch:
    """``with Stopwatch() as watch: ...``, then ``watch.cost``: wall and this process's CPU."""

    def __enter__(self) -> Stopwatch:
        self.cpu = time.process_time()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cost = Cost(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def best(samples: list[Cost]) -> Cost:
    """The best of K repetitions, wall and CPU each taken on its own."""
    return Cost(min(s.wall for s in samples), min(s.cpu for s in samples))


def broadcast_one_thread(impl: Any, contents: list[Any], channel: str) -> Cost:
    broadcast = impl.broadcast
    with Stopwatch() as watch:
        for content in contents:
            broadcast(channel, EVENT_NAME, content)
    return watch.cost.per(len(contents))


def broadcast_threads(impl: Any, contents: list[Any], threads: int, channel: str) -> Cost:
    """All threads start together on one shared client; wall time per message."""

    def broadcasts(own: str) -> None:
        for content in contents:
            impl.broadcast(own, EVENT_NAME, content)

    return in_threads(broadcasts, threads, channel).per(threads * len(contents))


def empty_calls_threads(impl: Any, calls: int, threads: int, channel: str) -> Cost:
    """Like ``broadcast_threads`` with unspools of a missing log, which cost Redis about 1 µs:
    what the threads cost the client before any work; wall time per call."""

    def unspools(own: str) -> None:
        for _ in range(calls):
            impl.unspool(own, 0)

    return in_threads(unspools, threads, channel).per(threads * calls)


def in_threads(work_on: Any, threads: int, channel: str) -> Cost:
    """Wall and CPU seconds for ``threads`` threads, released together, each running
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
    with Stopwatch() as watch:
        for worker in workers:
            worker.join()
    if errors:
        raise errors[0]
    return watch.cost


class BroadcastProcesses:
    """Worker processes that each broadcast in a loop when told to, all released at once: web
    workers sharing the host's CPUs with each other and with Redis. Started once and reused, so
    each implementation connects and warms up once per process, outside the timing."""

    def __init__(self, url: str, processes: int, calls: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.calls = calls
        self.barrier = context.Barrier(processes + 1, timeout=BARRIER_TIMEOUT)
        self.pipes: list[Connection] = []
        self.workers = []
        for index in range(processes):
            ours, theirs = context.Pipe()
            worker = context.Process(
                target=broadcast_worker,
                args=(url, index, calls, self.barrier, theirs),
                daemon=True,
            )
            worker.start()
            self.pipes.append(ours)
            self.workers.append(worker)

    def run(self, name: str) -> Cost:
        """Every worker broadcasts ``calls`` times through implementation ``name``: wall time
        from the release until the last one is done, and the workers' CPU, per message."""
        for pipe in self.pipes:
            pipe.send(name)
        self.barrier.wait()
        with Stopwatch() as watch:
            reports = [pipe.recv() for pipe in self.pipes]
        failures = [failure for _, failure in reports if failure]
        if failures:
            raise AssertionError(f"{name}: a worker process failed: {failures[0]}")
        cpu = sum(cpu for cpu, _ in reports)
        return Cost(watch.cost.wall, cpu).per(len(self.pipes) * self.calls)

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for worker in self.workers:
            worker.join(BARRIER_TIMEOUT)


# Longest a worker or the parent waits for the others (a worker that failed to start).
BARRIER_TIMEOUT = 120.0
WARM_UP_CALLS = 200


def broadcast_worker(url: str, index: int, calls: int, barrier: Any, pipe: Connection) -> None:
    """One process of ``BroadcastProcesses``: for each name received, broadcasts ``calls`` times
    after the common release and sends back (its CPU seconds, None) or (None, the error)."""
    impls: dict[str, Any] = {}
    contents = chat_messages(calls)
    while (name := pipe.recv()) is not None:
        failure = None
        try:
            if name not in impls:
                impls[name] = make(name, url, EXPIRE_MS)
                for content in contents[:WARM_UP_CALLS]:
                    impls[name].broadcast(f"warm-up:{index}", EVENT_NAME, content)
        except Exception as error:  # sent to the parent after the release
            failure = f"{type(error).__name__}: {error}"
        barrier.wait()
        if failure:
            pipe.send((None, failure))
            continue
        broadcast, channel = impls[name].broadcast, f"processes:{name}:{index}"
        try:
            with Stopwatch() as watch:
                for content in contents:
                    broadcast(channel, EVENT_NAME, content)
            pipe.send((watch.cost.cpu, None))
        except Exception as error:
            pipe.send((None, f"{type(error).__name__}: {error}"))
    for impl in impls.values():
        impl.close()


@dataclass(frozen=True)
class Sporadic:
    """Broadcasts made one at a time after a pause, as a web worker makes them."""

    wall: list[float]  # seconds, each call
    cpu: list[float]  # this process's CPU seconds, each call
    pings: int  # PINGs Redis received meanwhile (INFO commandstats)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def p99(self) -> float:
        return percentile(self.wall, 99)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def percentile(values: list[float], pct: int) -> float:
    """The nearest-rank percentile: a value that was measured."""
    ranked = sorted(values)
    return ranked[max(0, -(-len(ranked) * pct // 100) - 1)]


class BareBroadcast:
    """The floor of one broadcast: the EVALSHA of broadcast.lua that replaylog sends, built
    beforehand, written to a plain socket, and its reply read but not parsed. Each call sends the
    next message of ``contents`` whatever it is given: no client library does less."""

    name = "bare socket"

    def __init__(self, admin: redis.Redis, contents: list[Any]) -> None:
        sha = admin.script_load(BROADCAST_LUA.read_text())
        keys = [str(key) for key in Peer.script_keys("bare")] + ["mq:bare"]
        tail = [str(arg) for arg in Peer.tail_for(EXPIRE_MS)]
        self.requests = [
            resp_command(["EVALSHA", sha, *keys, Peer.head(EVENT_NAME, c).decode(), *tail])
            for c in contents
        ]
        self.sent = 0
        kwargs = admin.connection_pool.connection_kwargs
        self.sock = socket.create_connection((kwargs["host"], kwargs["port"]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kwargs.get("db"):
            self.sock.sendall(resp_command(["SELECT", str(kwargs["db"])]))
            self.sock.recv(16)

    def broadcast(self, channel: str, event_name: str, content: Any) -> None:
        self.sock.sendall(self.requests[self.sent % len(self.requests)])
        self.sent += 1
        reply = self.sock.recv(64)
        while not reply.endswith(b"\r\n"):
            reply += self.sock.recv(64)
        if not reply.startswith(b":"):
            raise AssertionError(f"bare socket: Redis answered {reply!r}")

    def close(self) -> None:
        self.sock.close()


def sporadic(
    impls: list[Any], admin: redis.Redis, rounds: int, per_round: int, seed: int = 15
) -> dict[str, Sporadic]:
    """Each broadcast after a random pause of ``SPORADIC_PAUSE``. The implementations, and a
    ``BareBroadcast`` as the floor, take turns a block of ``per_round`` calls at a time, with the
    same pauses in a round, so that each sees the same idle spells and, as near as can be, the
    same load on the machine."""
    rng = random.Random(seed)
    contents = chat_messages(per_round)
    bare = BareBroadcast(admin, contents)
    impls = [*impls, bare]
    wall: dict[str, list[float]] = {impl.name: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl.name: [] for impl in impls}
    pings = dict.fromkeys(wall, 0)
    for _ in range(rounds):
        pauses = [rng.uniform(*SPORADIC_PAUSE) for _ in contents]
        for impl in impls:
            admin.config_resetstat()
            channel = f"sporadic:{impl.name}"
            for pause, content in zip(pauses, contents):
                time.sleep(pause)
                with Stopwatch() as watch:
                    impl.broadcast(channel, EVENT_NAME, content)
                wall[impl.name].append(watch.cost.wall)
                cpu[impl.name].append(watch.cost.cpu)
            pings[impl.name] += int(commandstats(admin).get("ping", {}).get("calls", 0))
    bare.close()
    return {name: Sporadic(wall[name], cpu[name], pings[name]) for name in wall}


def broadcast_many(impl: Any, items: list[tuple[str, str, Any]]) -> Cost:
    with Stopwatch() as watch:
        timestamps = impl.broadcast_many(items)
    if len(timestamps) != len(items):
        raise AssertionError(f"{impl.name}: broadcast_many returned {len(timestamps)} timestamps")
    return watch.cost.per(len(items))


def unspool(impl: Any, channel: str, expected: int, raw: bool) -> Cost:
    read = impl.unspool_raw if raw else impl.unspool
    with Stopwatch() as watch:
        messages = read(channel, 0)
    if len(messages) != expected:
        raise AssertionError(f"{impl.name}: unspooled {len(messages)} of {expected} messages")
    return watch.cost.per(expected)


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
    return min(samples)


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
    return min(samples)


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
        # "base top fresh epoch break", as src/lua/broadcast.lua writes it.
        pipe.set(f"replaymeta:room-{index}", f"{min(members.values())} {newest} 1 {now}000 0")
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


def prune_timed(impl: Any) -> tuple[Cost, int]:
    with Stopwatch() as watch:
        removed = impl.prune()
    return watch.cost, removed


def commandstats(admin: redis.Redis) -> dict[str, dict[str, float]]:
    return {
        name[len("cmdstat_") :]: stats
        for name, stats in admin.info("commandstats").items()
        if name.startswith("cmdstat_")
    }
