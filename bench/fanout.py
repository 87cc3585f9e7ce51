"""Fan-out: many SSE clients on one worker (issue 17): ``python -m bench.fanout``.

For each number of clients N, two runs against one redis-server on loopback:

- **SSE view**: one uvicorn worker (``bench.sse_worker``) serves ``EventStreamView``; this
  process opens N raw SSE connections to it (asyncio sockets), broadcasts, and reads.
- **subscriptions**: one process (``bench.subscribers``) opens N ``asubscribe()`` directly.

Each run broadcasts ``--messages`` messages at ``--rate`` per second, each carrying its seq
and the ``time.time_ns()`` of its broadcast, and measures in the process that holds the
subscriptions: its Redis connections (``CLIENT LIST``, matched to its sockets), its RSS per
client, its CPU per delivered message, the broadcast-to-delivery latency, and per client what
was lost, duplicated or out of order. One more run per kind kills the pub/sub connection
(``CLIENT KILL TYPE pubsub``) halfway. Every run stops by itself: the clients are done when
each has every message, or at ``--settle`` seconds after the last broadcast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

import replaylog
from bench.server import RedisServer, free_port

CHANNEL = "fanout"
EVENT_NAME = "tick"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START, END = "<!-- fanout:start -->", "<!-- fanout:end -->"

# Connections opening at once: more only queue up in the worker's backlog.
OPENING_AT_ONCE = 200
OPEN_TIMEOUT_S = 300
# After the last client has every message, how long the clients keep reading for duplicates.
DUPLICATE_GRACE_S = 0.3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_open_files_limit() -> None:
    """Thousands of clients need as many sockets: the soft limit up to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the process that holds the subscriptions, seen from outside ---------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of the process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def local_ports_to(pid: int, port: int) -> set[int]:
    """The local ports of the process's TCP sockets connected to ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def redis_connections(admin: redis.Redis, pid: int) -> dict[str, int]:
    """How many connections Redis has from the process, pub/sub and other."""
    port = admin.connection_pool.connection_kwargs["port"]
    ports = local_ports_to(pid, port)
    clients = admin.client_list()
    held = [c for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports]
    pubsub = sum(1 for c in held if "P" in c["flags"])
    return {"pubsub": pubsub, "other": len(held) - pubsub, "redis_total": len(clients)}


# --- the SSE load generator ----------------------------------------------------------------


class SseClient:
    """A GET of the SSE view on a raw socket. Frames are kept with the time they arrived and
    parsed after the run, so that parsing one client's frames does not delay the others."""

    def __init__(self, messages: int) -> None:
        self.messages = messages
        self.ticks: list[tuple[int, bytes]] = []
        self.resets = 0
        self.writer: asyncio.StreamWriter | None = None
        self.stream: AsyncIterator[tuple[int, bytes]] | None = None

    async def open(self, port: int) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(b"GET /events/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200" or b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"unexpected response: {head!r}")
        self.stream = self.frames(reader)
        _, frame = await self.stream.__anext__()
        if b"event: stream-open" not in frame:
            raise RuntimeError(f"stream did not open: {frame!r}")

    @staticmethod
    async def frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
        """``(arrival time_ns, frame)`` for each SSE frame, until the stream ends."""
        pending = b""
        while True:
            size = int(await reader.readline(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return
            arrived = time.time_ns()
            pending += chunk[:size]
            *complete, pending = pending.split(b"\n\n")
            for frame in complete:
                yield arrived, frame

    async def read(self, done: asyncio.Event, unfinished: list[int]) -> None:
        assert self.stream is not None
        async for arrived, frame in self.stream:
            if b"event: " + EVENT_NAME.encode() in frame:
                self.ticks.append((arrived, frame))
                if len(self.ticks) == self.messages:
                    unfinished[0] -= 1
                    if unfinished[0] == 0:
                        done.set()
            elif b"event: stream-reset" in frame:
                self.resets += 1

    def deliveries(self) -> list[int]:
        """``[seq, latency_ns, ...]`` as :mod:`bench.subscribers` reports them."""
        flat: list[int] = []
        for arrived, frame in self.ticks:
            data = next(line for line in frame.split(b"\n") if line.startswith(b"data: "))
            content = json.loads(data[6:])["content"]
            flat += (content["seq"], arrived - content["sent_ns"])
        return flat

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def open_all(clients: list[SseClient], port: int) -> None:
    opening = asyncio.Semaphore(OPENING_AT_ONCE)

    async def open_one(client: SseClient) -> None:
        async with opening:
            await client.open(port)

    await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in clients)), OPEN_TIMEOUT_S)


# --- one run -------------------------------------------------------------------------------


@dataclass
class Options:
    messages: int
    settle: float


@dataclass
class Run:
    kind: str
    clients: int
    rate: float
    kill: bool
    opened_s: float = 0.0
    connections: dict[str, int] = field(default_factory=dict)
    connections_after: dict[str, int] = field(default_factory=dict)
    rss_base_kib: int = 0
    rss_kib: int = 0
    cpu_open_s: float = 0.0
    cpu_stream_s: float = 0.0
    # This process's CPU meanwhile: the SSE clients' reading, or only the broadcasts.
    generator_cpu_s: float = 0.0
    stream_s: float = 0.0
    killed: int = 0
    # Listeners of the channel right after the broadcast that followed the kill: 0 proves that
    # Redis published that message to nobody, so the clients could only get it from the log.
    listeners_after_kill: int = -1
    delivered: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    last_client_p50_ms: float = 0.0
    max_ms: float = 0.0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    resets: int = 0
    load: tuple[float, float] = (0.0, 0.0)
    error: str = ""

    @property
    def rss_per_client_kib(self) -> float:
        return (self.rss_kib - self.rss_base_kib) / self.clients

    @property
    def cpu_per_message_us(self) -> float:
        return self.cpu_stream_s / self.delivered * 1e6 if self.delivered else float("nan")


def percentile(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def tally(run: Run, per_client: list[tuple[list[int], int]], messages: int) -> None:
    """Latencies, and per client what was lost, duplicated or out of order."""
    latencies = []
    slowest = [0] * messages
    for flat, resets in per_client:
        seqs, lags = flat[0::2], flat[1::2]
        run.delivered += len(seqs)
        run.resets += resets
        distinct = set(seqs)
        run.lost += messages - len(distinct)
        run.duplicated += len(seqs) - len(distinct)
        run.out_of_order += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        latencies += lags
        for seq, lag in zip(seqs, lags):
            slowest[seq] = max(slowest[seq], lag)
    if latencies:
        latencies.sort()
        run.p50_ms = percentile(latencies, 0.5) / 1e6
        run.p99_ms = percentile(latencies, 0.99) / 1e6
        run.max_ms = latencies[-1] / 1e6
        run.last_client_p50_ms = percentile(sorted(slowest), 0.5) / 1e6


async def broadcast_all(
    log: replaylog.ReplayLog, admin: redis.Redis, run: Run, options: Options
) -> None:
    """The messages at ``run.rate``; with ``run.kill``, the pub/sub connections are
    killed halfway."""
    start = time.monotonic()
    for seq in range(options.messages):
        await asyncio.sleep(max(0.0, start + seq / run.rate - time.monotonic()))
        killing = run.kill and seq == options.messages // 2
        if killing:
            # Redis refuses new connections until this broadcast is out, so that the hub
            # cannot resubscribe first: the message can then only come from the log.
            maxclients = str(admin.config_get("maxclients")["maxclients"])
            admin.config_set("maxclients", len(admin.client_list(_type="normal")))
            run.killed = admin.client_kill_filter(_type="pubsub")
        await log.abroadcast(CHANNEL, EVENT_NAME, {"seq": seq, "sent_ns": time.time_ns()})
        if killing:
            [(_, listeners)] = admin.pubsub_numsub(f"mq:{CHANNEL}")
            run.listeners_after_kill = int(listeners)
            admin.config_set("maxclients", maxclients)


def start_process(args: list[str], url: str, output: IO[bytes], **kwargs: Any) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPLAYLOG_", "DJANGO_"))}
    env["REPLAYLOG_URL"] = url
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stderr=output, **kwargs
    )


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def sse_run(url: str, admin: redis.Redis, run: Run, options: Options) -> None:
    port = free_port()
    with tempfile.TemporaryFile() as output:
        worker = start_process(["bench.sse_worker", str(port)], url, output)
        clients = [SseClient(options.messages) for _ in range(run.clients)]
        try:
            await wait_listening(port, worker)
            # One stream opened and closed first: imports and Redis connections are made.
            warm_up = SseClient(options.messages)
            await warm_up.open(port)
            warm_up.close()
            await asyncio.sleep(0.5)
            run.rss_base_kib, cpu_start = rss_kib(worker.pid), cpu_seconds(worker.pid)
            started = time.monotonic()
            await open_all(clients, port)
            run.opened_s = time.monotonic() - started
            cpu_opened = cpu_seconds(worker.pid)
            run.cpu_open_s = cpu_opened - cpu_start
            run.connections = redis_connections(admin, worker.pid)
            done, unfinished = asyncio.Event(), [run.clients]
            readers = [asyncio.ensure_future(c.read(done, unfinished)) for c in clients]
            log = replaylog.ReplayLog(url)
            streaming, own_cpu = time.monotonic(), time.process_time()
            await broadcast_all(log, admin, run, options)
            try:
                await asyncio.wait_for(done.wait(), options.settle)
            except asyncio.TimeoutError:
                pass
            run.stream_s = time.monotonic() - streaming
            await asyncio.sleep(DUPLICATE_GRACE_S)
            run.cpu_stream_s = cpu_seconds(worker.pid) - cpu_opened
            run.generator_cpu_s = time.process_time() - own_cpu
            run.rss_kib = rss_kib(worker.pid)
            run.connections_after = redis_connections(admin, worker.pid)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            log.close()
            tally(run, [(c.deliveries(), c.resets) for c in clients], options.messages)
        finally:
            for client in clients:
                client.close()
            stop_process(worker)
            output.seek(0)
            errors = output.read().decode(errors="replace")
            if "Traceback" in errors or "ERROR" in errors:
                run.error = errors[-2000:]


async def wait_listening(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never listened") from None
            await asyncio.sleep(0.05)


async def subscriptions_run(url: str, admin: redis.Redis, run: Run, options: Options) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryFile() as output:
        args = ["bench.subscribers", url, str(run.clients), str(options.messages)]
        holder = start_process(args, url, output, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdin is not None and holder.stdout is not None
        try:
            warm = await loop.run_in_executor(None, holder.stdout.readline)
            if warm != b"warm\n":
                raise RuntimeError(f"bench.subscribers did not start: {warm!r}")
            await asyncio.sleep(0.5)
            run.rss_base_kib, cpu_start = rss_kib(holder.pid), cpu_seconds(holder.pid)
            started = time.monotonic()
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            ready = await loop.run_in_executor(None, holder.stdout.readline)
            if ready != b"ready\n":
                raise RuntimeError(f"bench.subscribers did not subscribe: {ready!r}")
            run.opened_s = time.monotonic() - started
            cpu_opened = cpu_seconds(holder.pid)
            run.cpu_open_s = cpu_opened - cpu_start
            run.connections = redis_connections(admin, holder.pid)
            log = replaylog.ReplayLog(url)
            streaming, own_cpu = time.monotonic(), time.process_time()
            await broadcast_all(log, admin, run, options)
            results = loop.run_in_executor(None, holder.stdout.readline)
            try:
                line = await asyncio.wait_for(asyncio.shield(results), options.settle)
            except asyncio.TimeoutError:
                holder.stdin.write(b"stop\n")
                holder.stdin.flush()
                line = await results
            # The results come after the grace for duplicates.
            run.stream_s = time.monotonic() - streaming - DUPLICATE_GRACE_S
            run.cpu_stream_s = cpu_seconds(holder.pid) - cpu_opened
            run.generator_cpu_s = time.process_time() - own_cpu
            run.rss_kib = rss_kib(holder.pid)
            run.connections_after = redis_connections(admin, holder.pid)
            log.close()
            holder.stdin.close()
            tally(run, json.loads(line), options.messages)
        finally:
            stop_process(holder)
            output.seek(0)
            errors = output.read().decode(errors="replace")
            if "Traceback" in errors:
                run.error = errors[-2000:]


async def one_run(run: Run, url: str, options: Options) -> Run:
    admin = redis.Redis.from_url(url)
    admin.flushall()
    load_start = os.getloadavg()[0]
    try:
        if run.kind == "SSE view":
            await sse_run(url, admin, run, options)
        else:
            await subscriptions_run(url, admin, run, options)
    except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
        run.error = f"{type(error).__name__}: {error}" + (f"\n{run.error}" if run.error else "")
    finally:
        admin.close()
    run.load = (load_start, os.getloadavg()[0])
    return run


# --- the report ----------------------------------------------------------------------------


def milliseconds(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def table(runs: list[Run]) -> str:
    header = [
        "clients",
        "how",
        "Redis connections held (pub/sub + other)",
        "RSS per client",
        "CPU per delivered message",
        "latency p50",
        "latency p99",
        "last client, p50 over messages",
        "lost / duplicated / out of order / resets",
    ]
    rows = []
    for run in runs:
        label = f"{run.kind}, {run.rate:g}/s" + (", pub/sub killed halfway" if run.kill else "")
        if run.error:
            rows.append([f"{run.clients:,}", label, "failed: see below", *[""] * 6])
            continue
        held = run.connections
        rows.append(
            [
                f"{run.clients:,}",
                label,
                f"{held['pubsub']} + {held['other']}",
                f"{run.rss_per_client_kib:.1f} KiB",
                f"{run.cpu_per_message_us:.1f} µs",
                milliseconds(run.p50_ms),
                milliseconds(run.p99_ms),
                milliseconds(run.last_client_p50_ms),
                f"{run.lost} / {run.duplicated} / {run.out_of_order} / {run.resets}",
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def notes(runs: list[Run], options: Options) -> list[str]:
    lines = []
    for run in runs:
        label = f"{run.kind}, {run.clients:,} clients, {run.rate:g}/s" + (
            ", killed" if run.kill else ""
        )
        if run.error:
            lines.append(f"{label}: FAILED: {run.error.strip().splitlines()[-1]}")
            continue
        after = run.connections_after
        killed = (
            f"; pub/sub connections killed: {run.killed}, listeners right after the next "
            f"broadcast: {run.listeners_after_kill}"
            if run.kill
            else ""
        )
        lines.append(
            f"{label}: opened in {run.opened_s:.1f} s, "
            f"{run.cpu_open_s * 1e3 / run.clients:.2f} ms of CPU each; RSS "
            f"{run.rss_base_kib / 1024:.0f} MiB before, {run.rss_kib / 1024:.0f} MiB after; "
            f"{run.delivered:,} of {run.clients * options.messages:,} delivered in "
            f"{run.stream_s:.1f} s ({run.delivered / run.stream_s:,.0f} per s) and "
            f"{run.cpu_stream_s:.2f} s of CPU (this process, "
            f"{'reading the streams' if run.kind == 'SSE view' else 'broadcasting'}: "
            f"{run.generator_cpu_s:.2f} s); latency max {run.max_ms:.0f} ms{killed}; "
            f"at the end {after.get('pubsub')} + {after.get('other')} connections held, "
            f"{after.get('redis_total')} clients on Redis in all; load average "
            f"{run.load[0]:.1f} → {run.load[1]:.1f}"
        )
    return lines


def markdown(runs: list[Run], options: Options, command: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        f"From `{command}`, {when}, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {options.messages} messages per run.",
        "",
        table(runs),
        "",
        *(f"- {line}" for line in notes(runs, options)),
    ]
    return "\n".join(parts)


def update_readme(text: str, section: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{section}\n{END}{tail}"


# --- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument(
        "--smoke", action="store_true", help="20 clients, 5 messages; writes nothing"
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[100, 1_000, 5_000], help="values of N"
    )
    parser.add_argument(
        "--kill-clients",
        type=int,
        nargs="*",
        default=[1_000, 5_000],
        help="values of N of the runs that kill the pub/sub connection halfway",
    )
    parser.add_argument("--messages", type=int, default=20, help="messages per run")
    parser.add_argument("--rate", type=float, default=5.0, help="messages per second")
    parser.add_argument(
        "--slow-rate",
        type=float,
        help="one more run at the largest N at this rate: the latency below saturation",
    )
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds to wait after the last broadcast"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["SSE view", "subscriptions"],
        choices=["SSE view", "subscriptions"],
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


async def run_all(url: str, args: argparse.Namespace, options: Options) -> list[Run]:
    runs = []
    for kind in args.kinds:
        plan = [Run(kind, n, args.rate, kill=False) for n in args.clients]
        plan += [Run(kind, n, args.rate, kill=True) for n in args.kill_clients]
        if args.slow_rate:
            plan.append(Run(kind, max(args.clients), args.slow_rate, kill=False))
        for run in plan:
            what = f"{run.clients} clients at {run.rate:g}/s" + (", kill" if run.kill else "")
            print(f"fanout: {kind}, {what}", file=sys.stderr, flush=True)
            runs.append(await one_run(run, url, options))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.clients, args.kill_clients, args.messages, args.rate = [20], [20], 5, 10.0
    options = Options(args.messages, args.settle)
    raise_open_files_limit()
    with RedisServer() as server:
        runs = asyncio.run(run_all(server.url, args, options))
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(runs, options, f".venv/bin/python -m bench.fanout {arguments}".strip())
    print(section)
    print(json.dumps([asdict(run) for run in runs]), file=sys.stderr)
    if not (args.smoke or args.no_write):
        readme = HERE / "README.md"
        readme.write_text(update_readme(readme.read_text(), section))
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
