"""``python -m bench`` (from .venv): run every workload on one redis-server, record results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import redis

from bench import floors, measure, report
from bench.impls import BROADCAST_LUA, IMPLEMENTATIONS, POLLING, Peer, require_hiredis
from bench.measure import EXPIRE_MS, FULL, SMOKE, Sizes
from bench.payload import EVENT_NAME, chat_messages, content_size, stored_size
from bench.server import RedisServer

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one repetition, no targets; writes nothing into bench/",
    )
    parser.add_argument(
        "--url",
        help="use this Redis instead of starting one; its database must be empty "
        "(the benchmark flushes it)",
    )
    parser.add_argument("-k", "--repeat", type=int, help="best of K repetitions (default 5)")
    parser.add_argument(
        "--out",
        type=Path,
        help="where README.md and results.png go (default: bench/, or a temp dir with --smoke)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave README.md and the chart alone"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_hiredis()
    sizes = SMOKE if args.smoke else FULL
    if args.repeat:
        sizes = Sizes(**{**asdict(sizes), "repeat": args.repeat})
    if args.url:
        admin = redis.Redis.from_url(args.url)
        if admin.dbsize():
            raise SystemExit(
                f"bench: the database at --url has {admin.dbsize()} keys; use an empty one"
            )
        admin.close()
        results = run(args.url, sizes, args.smoke)
    else:
        with RedisServer() as server:
            results = run(server.url, sizes, args.smoke)
    print(report.console(results))
    if args.no_write:
        return 0
    if args.smoke and args.out is None:
        with tempfile.TemporaryDirectory(prefix="replaylog-bench-smoke-") as out:
            write_outputs(results, Path(out))
    else:
        write_outputs(results, args.out or HERE)
    return 0


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    text = readme.read_text() if readme.exists() else (HERE / "README.md").read_text()
    readme.write_text(report.update_readme(text, report.markdown(results)))
    report.chart(results, out / "results.png")
    (out / "results").mkdir(exist_ok=True)
    (out / "results" / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"bench: wrote {readme}, {out / 'results.png'} and {out / 'results' / 'latest.json'}")


def run(url: str, sizes: Sizes, smoke: bool) -> dict[str, Any]:
    admin = redis.Redis.from_url(url)
    server_info = admin.info("server")
    results: dict[str, Any] = {
        "smoke": smoke,
        "sizes": asdict(sizes),
        "environment": {
            "redis": server_info.get("redis_version"),
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "date": time.strftime("%Y-%m-%d"),
            "load_average_start": os.getloadavg(),
        },
        "payload": {"content_bytes": content_size(), "stored_bytes": stored_size()},
        "workloads": {},  # workload -> implementation -> wall seconds per unit
        "client_cpu": {},  # workload -> implementation -> the client's CPU seconds per unit
        "notes": {},
    }
    workloads, client_cpu = results["workloads"], results["client_cpu"]
    redis_cpu = results["redis_cpu"] = {}  # workload -> implementation -> Redis s per unit
    impls = [cls(url, EXPIRE_MS) for cls in IMPLEMENTATIONS]
    # replaylog with busy polling on rides along in every workload, so the report can show
    # what polling buys in wall time and costs in CPU, in the same run.
    everyone = [*impls, POLLING(url, EXPIRE_MS)]
    processes = measure.BroadcastProcesses(url, sizes.processes, sizes.per_process)

    def repeated(
        workload: str,
        units: int,
        timed: Callable[[Any], measure.Cost],
        setup: Callable[[Any], None] | None = None,
        which: list[Any] | None = None,
    ) -> None:
        """Best of K runs of ``timed`` per implementation, interleaved, with Redis CPU."""
        chosen = everyone if which is None else which
        samples: dict[str, list[measure.Cost]] = {impl.name: [] for impl in chosen}
        cpu = redis_cpu.setdefault(workload, {})
        for _ in range(sizes.repeat):
            for impl in chosen:
                if setup is not None:
                    setup(impl)
                admin.config_resetstat()
                samples[impl.name].append(timed(impl))
                cpu[impl.name] = redis_busy_us(measure.commandstats(admin)) / units / 1e6
        costs = {name: measure.best(runs) for name, runs in samples.items()}
        workloads[workload] = {name: cost.wall for name, cost in costs.items()}
        client_cpu[workload] = {name: cost.cpu for name, cost in costs.items()}

    try:
        admin.flushall()
        log("bench: floors (redis-benchmark)")
        results["floors"] = measure_floors(url, admin, sizes)

        log("bench: broadcast, one thread")
        contents = chat_messages(sizes.broadcast)
        for impl in everyone:  # connect, load scripts, warm caches
            for content in contents[:200]:
                impl.broadcast("warm-up", EVENT_NAME, content)
        server_cost = results["redis_us_per_broadcast"] = {}

        def one_thread(impl: Any) -> measure.Cost:
            cost = measure.broadcast_one_thread(impl, contents, f"one:{impl.name}")
            server_cost[impl.name] = redis_cost(measure.commandstats(admin), impl.name)
            return cost

        repeated("broadcast", sizes.broadcast, one_thread)

        log(
            f"bench: sporadic broadcasts, {sizes.sporadic_rounds * sizes.sporadic_per_round} "
            "per implementation"
        )
        sporadic = measure.sporadic(
            everyone, admin, sizes.sporadic_rounds, sizes.sporadic_per_round
        )
        bare = sporadic.pop(measure.BareBroadcast.name)
        results["sporadic"] = {
            name: {
                "median": calls.median,
                "p99": calls.p99,
                "median_cpu": calls.median_cpu,
                "calls": len(calls.wall),
                "pings": calls.pings,
            }
            for name, calls in sporadic.items()
        }
        workloads["sporadic"] = {name: calls.median for name, calls in sporadic.items()}
        workloads["sporadic_p99"] = {name: calls.p99 for name, calls in sporadic.items()}
        client_cpu["sporadic"] = {name: calls.median_cpu for name, calls in sporadic.items()}

        log(f"bench: broadcast, {sizes.threads} threads")
        per_thread = chat_messages(sizes.per_thread)
        repeated(
            "broadcast_threads",
            sizes.threads * sizes.per_thread,
            lambda impl: measure.broadcast_threads(
                impl, per_thread, sizes.threads, f"threads:{impl.name}"
            ),
        )

        log(f"bench: broadcast, {sizes.processes} processes")
        repeated(
            "broadcast_processes",
            sizes.processes * sizes.per_process,
            lambda impl: processes.run(impl.name),
        )

        # Threads alone, without the work: what 8 Python threads cost each client per call.
        limits = results["limits"] = {}
        limits["sporadic_bare"] = {"median": bare.median, "p99": bare.p99, "cpu": bare.median_cpu}
        limits["empty_call_threads"] = {
            impl.name: measure.best(
                [
                    measure.empty_calls_threads(
                        impl, sizes.per_thread, sizes.threads, f"empty:{impl.name}"
                    )
                    for _ in range(sizes.repeat)
                ]
            ).wall
            for impl in impls
            if impl.name != "article"
        }

        log(f"bench: broadcast_many of {sizes.many:,}")
        admin.flushall()
        many = chat_messages(sizes.many)
        repeated(
            "broadcast_many",
            sizes.many,
            lambda impl: measure.broadcast_many(
                impl, [(f"many:{impl.name}", EVENT_NAME, content) for content in many]
            ),
            which=[impl for impl in everyone if impl.has_broadcast_many],
        )
        for impl in impls:
            if impl.broadcast_many_note:
                results["notes"][f"broadcast_many:{impl.name}"] = impl.broadcast_many_note

        log(f"bench: unspool of {sizes.unspool:,}")
        admin.flushall()
        memory = results["memory"] = {}
        for impl in everyone:
            key = f"spool:{impl.name}"
            measure.fill(impl, key, sizes.unspool)
            if impl not in impls:
                continue
            entries = admin.zcard(f"replay:{key}")
            used = admin.memory_usage(f"replay:{key}", samples=0)
            used += admin.memory_usage(f"replaymeta:{key}", samples=0) or 0  # ours only
            memory[impl.name] = {"entries": entries, "bytes_per_message": used / entries}
        for raw in (False, True):
            repeated(
                "unspool_raw" if raw else "unspool",
                sizes.unspool,
                lambda impl, raw=raw: measure.unspool(
                    impl, f"spool:{impl.name}", sizes.unspool, raw
                ),
            )

        # What the unspool targets run into: the reply's bytes read off a socket, unparsed, and
        # CPython creating the same objects with no text to parse (marshal).
        ours = next(impl for impl in impls if impl.name == "replaylog")
        limits["reply_bytes"] = (
            measure.reply_bytes(
                admin, ["ZRANGEBYSCORE", "replay:spool:replaylog", "(0", "+inf"], 4 * sizes.repeat
            )
            / sizes.unspool
        )
        for raw, name in ((False, "objects_dicts"), (True, "objects_str")):
            messages = (ours.unspool_raw if raw else ours.unspool)("spool:replaylog", 0)
            limits[name] = measure.unmarshal(messages, sizes.repeat) / sizes.unspool

        log(f"bench: prune of {sizes.channels:,} channels")
        expected = 0

        def fill(impl: Any) -> None:
            nonlocal expected
            admin.flushall()
            expected = measure.fill_for_prune(admin, sizes.channels, sizes.per_channel)

        def prune(impl: Any) -> measure.Cost:
            cost, removed = measure.prune_timed(impl)
            if removed != expected:
                raise AssertionError(f"{impl.name}: pruned {removed}, expected {expected}")
            return cost.per(sizes.channels)

        repeated("prune", sizes.channels, prune, setup=fill)
        stalls = results["stall"] = {}
        for impl in impls:  # once more each, watched by a PING loop and LATENCY
            fill(impl)
            elapsed, removed, stall = measure.prune_with_stall(impl, admin, url)
            stalls[impl.name] = {**asdict(stall), "seconds": elapsed}
            if removed != expected:
                raise AssertionError(f"{impl.name}: pruned {removed}, expected {expected}")
        admin.flushall()
        results["environment"]["load_average_end"] = os.getloadavg()
    finally:
        processes.close()
        for impl in everyone:
            impl.close()
        admin.close()
    return results


def measure_floors(url: str, admin: redis.Redis, sizes: Sizes) -> dict[str, Any]:
    if not floors.available():
        log("bench: redis-benchmark is not on PATH; floors skipped")
        return {"note": "redis-benchmark not found"}
    rtt_us, rows = floors.bare_round_trip(url, sizes.ping_requests)
    sha = admin.script_load(BROADCAST_LUA.read_text())
    # The arguments replaylog sends (see Peer.broadcast), on one channel.
    head = Peer.head(EVENT_NAME, chat_messages(1)[0]).decode()
    args = [str(key) for key in Peer.script_keys("bench-ceiling")] + ["mq:bench-ceiling", head]
    args += [str(arg) for arg in Peer.tail_for(EXPIRE_MS)]
    ceiling = floors.script_ceiling(url, sha, args, sizes.ceiling_requests)
    admin.delete(*Peer.script_keys("bench-ceiling")[1:])
    return {
        "rtt_p50_us": rtt_us,
        "ping": [asdict(row) for row in rows],
        "ceiling_msgs_per_s": ceiling,
        "ceiling_requests": sizes.ceiling_requests,
    }


# Commands a script runs are counted in commandstats too; only count what clients sent.
TOP_LEVEL_WITH_SCRIPTS = {"evalsha", "scan", "zrangebyscore", "time"}
NOT_WORKLOAD = {"info", "config", "ping", "flushall", "memory", "zcard", "script"}


def redis_busy_us(stats: dict[str, dict[str, float]]) -> float:
    """Microseconds Redis spent on the workload's commands since CONFIG RESETSTAT."""
    if "evalsha" in stats:
        names = TOP_LEVEL_WITH_SCRIPTS
    else:
        names = set(stats) - NOT_WORKLOAD
    return sum(stats[name].get("usec", 0) for name in names if name in stats)


def redis_cost(stats: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    """Redis CPU per broadcast in µs, from INFO commandstats since CONFIG RESETSTAT."""
    if name == "article":
        publish, zadd = stats.get("publish", {}), stats.get("zadd", {})
        calls = publish.get("calls", 0)
        usec = publish.get("usec", 0) + zadd.get("usec", 0)
        return {"us": usec / calls if calls else 0.0, "commands": "PUBLISH + ZADD"}
    evalsha = stats.get("evalsha", {})
    calls = evalsha.get("calls", 0)
    return {
        "us": evalsha.get("usec", 0) / calls if calls else 0.0,
        "commands": "EVALSHA of broadcast.lua",
    }
