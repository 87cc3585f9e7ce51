"""Tables for the terminal and README.md, and the chart."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

IMPLS = ("article", "peer", "replaylog")
# replaylog with busy polling on, measured beside its default (see bench.impls.NativePolling).
POLLING = "replaylog, busy_poll_us=200"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def workloads(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, unit) of each workload, in order."""
    sizes = results["sizes"]
    return [
        ("broadcast", "broadcast, 1 thread", "call"),
        ("sporadic", "broadcast 20–200 ms apart, median", "call"),
        ("sporadic_p99", "broadcast 20–200 ms apart, p99", "call"),
        ("broadcast_threads", f"broadcast, {sizes['threads']} threads", "message"),
        ("broadcast_processes", f"broadcast, {sizes['processes']} processes", "message"),
        ("broadcast_many", f"broadcast_many of {sizes['many']:,}", "message"),
        ("unspool", f"unspool {sizes['unspool']:,} to dicts", "message"),
        ("unspool_raw", f"unspool(raw=True) {sizes['unspool']:,}", "message"),
        ("prune", f"prune {sizes['channels']:,} channels", "channel"),
    ]


def us(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    value = seconds * 1e6
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) for each target of issue 3."""
    w = results["workloads"]
    fl = results.get("floors", {})
    rows: list[tuple[str, str, str, bool | None]] = []

    def versus(workload: str, peer: str, minimum: float) -> None:
        value = ratio(w[workload].get(peer), w[workload].get("replaylog"))
        met = None if value is None else value >= minimum
        rows.append((f"{workload}: {peer} / replaylog", times(value), f"≥ {minimum:g}×", met))

    versus("broadcast", "article", 3)
    versus("broadcast", "peer", 1.8)
    versus("sporadic", "peer", 2)
    rtt = fl.get("rtt_p50_us")
    if rtt:
        value = w["broadcast"]["replaylog"] * 1e6 / rtt
        rows.append(("broadcast: replaylog / bare RTT p50", times(value), "≤ 1.5×", value <= 1.5))
    versus("broadcast_threads", "peer", 5)
    ceiling = fl.get("ceiling_msgs_per_s")
    if ceiling:
        share = 1 / w["broadcast_many"]["replaylog"] / ceiling
        rows.append(
            ("broadcast_many: replaylog / script ceiling", f"{share:.0%}", "≥ 50%", share >= 0.5)
        )
    versus("unspool", "peer", 4)
    versus("unspool_raw", "peer", 8)
    versus("prune", "article", 25)
    versus("prune", "peer", 1.5)
    stall = results.get("stall", {}).get("replaylog")
    if stall:
        worst = max(stall["ping_max_ms"], stall["latency_max_ms"] or 0)
        rows.append(
            ("prune: replaylog's worst Redis stall", f"{worst:.1f} ms", "≤ 10 ms", worst <= 10)
        )
    return rows


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{width}}}" for width in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * width for width in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def main_table(results: dict[str, Any], markdown: bool) -> str:
    w = results["workloads"]
    header = ["workload", "unit", *(f"{name} µs" for name in IMPLS)]
    header += ["article / replaylog", "peer / replaylog", "Redis CPU µs (replaylog)"]
    rows = []
    for key, label, unit in workloads(results):
        cells = w.get(key, {})
        note = (
            " *" if key == "broadcast_many" and "broadcast_many:article" in results["notes"] else ""
        )
        rows.append(
            [
                label,
                f"per {unit}",
                us(cells.get("article")) + note,
                us(cells.get("peer")),
                us(cells.get("replaylog")),
                times(ratio(cells.get("article"), cells.get("replaylog"))),
                times(ratio(cells.get("peer"), cells.get("replaylog"))),
                us(results.get("redis_cpu", {}).get(key, {}).get("replaylog")),
            ]
        )
    return _table(header, rows, markdown)


def cpu_table(results: dict[str, Any], markdown: bool) -> str:
    cpu = results["client_cpu"]
    header = ["workload", "unit", *(f"{name} CPU µs" for name in IMPLS)]
    header += ["article / replaylog", "peer / replaylog"]
    rows = []
    for key, label, unit in workloads(results):
        cells = cpu.get(key)
        if not cells:
            continue
        rows.append(
            [
                label,
                f"per {unit}",
                *(us(cells.get(name)) for name in IMPLS),
                times(ratio(cells.get("article"), cells.get("replaylog"))),
                times(ratio(cells.get("peer"), cells.get("replaylog"))),
            ]
        )
    return _table(header, rows, markdown)


def polling_table(results: dict[str, Any], markdown: bool) -> str:
    """replaylog's default beside busy polling on, wall and client CPU, per workload."""
    w, cpu = results["workloads"], results["client_cpu"]
    header = ["workload", "unit", "default wall µs", "polling wall µs", "wall: polling / default"]
    header += ["default CPU µs", "polling CPU µs", "CPU: polling / default"]
    rows = []
    for key, label, unit in workloads(results):
        walls, cpus = w.get(key, {}), cpu.get(key, {})
        if POLLING not in walls:
            continue
        rows.append(
            [
                label,
                f"per {unit}",
                us(walls.get("replaylog")),
                us(walls.get(POLLING)),
                times(ratio(walls.get(POLLING), walls.get("replaylog"))),
                us(cpus.get("replaylog")),
                us(cpus.get(POLLING)),
                times(ratio(cpus.get(POLLING), cpus.get("replaylog"))),
            ]
        )
    return _table(header, rows, markdown)


def targets_table(results: dict[str, Any], markdown: bool) -> str:
    rows = []
    for what, value, target, met in targets(results):
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        rows.append([what, value, target, verdict])
    return _table(["target", "measured", "wanted", "verdict"], rows, markdown)


def extras(results: dict[str, Any], markdown: bool) -> str:
    w = results["workloads"]
    fl = results.get("floors", {})
    bullet = "- " if markdown else "  "
    lines = []
    if fl.get("rtt_p50_us"):
        one = w["broadcast"]["replaylog"] * 1e6
        lines.append(
            f"{bullet}Bare round trip (redis-benchmark -c 1 PING, p50): {fl['rtt_p50_us']:.1f} µs; "
            f"replaylog's broadcast takes {one:.1f} µs = {one / fl['rtt_p50_us']:.2f}× that."
        )
    if fl.get("ceiling_msgs_per_s"):
        ceiling = fl["ceiling_msgs_per_s"]
        rate = 1 / w["broadcast_many"]["replaylog"]
        lines.append(
            f"{bullet}Script ceiling (redis-benchmark -P 64 EVALSHA of broadcast.lua): "
            f"{ceiling:,.0f} msgs/s; replaylog's broadcast_many: {rate:,.0f} msgs/s "
            f"= {rate / ceiling:.0%} of it."
        )
    if fl.get("note"):
        lines.append(f"{bullet}Floors: {fl['note']}.")
    lines += limit_lines(results, bullet)
    processes = w.get("broadcast_processes", {})
    if processes:
        rates = ", ".join(f"{name} {1 / processes[name]:,.0f}" for name in processes)
        lines.append(
            f"{bullet}{results['sizes']['processes']} processes × "
            f"{results['sizes']['per_process']:,} broadcasts, all at once on "
            f"{results['environment']['machine']}: messages per second: {rates}."
        )
    sporadic = results.get("sporadic", {})
    if sporadic:
        pings = ", ".join(f"{name} {sporadic[name]['pings']}" for name in sporadic)
        calls = next(iter(sporadic.values()))["calls"]
        lines.append(
            f"{bullet}Sporadic: {calls} broadcasts per implementation, each after a random "
            f"20–200 ms pause (the implementations take turns, a block of "
            f"{results['sizes']['sporadic_per_round']} calls each, with the same pauses); "
            f"PINGs Redis received meanwhile: {pings}."
        )
    cost = results.get("redis_us_per_broadcast", {})
    if cost:
        parts = [f"{name} {cost[name]['us']:.2f} µs ({cost[name]['commands']})" for name in cost]
        lines.append(
            f"{bullet}Redis CPU per broadcast (INFO commandstats): " + "; ".join(parts) + "."
        )
    memory = results.get("memory", {})
    if memory:
        parts = [f"{name} {memory[name]['bytes_per_message']:.0f} B" for name in memory]
        lines.append(
            f"{bullet}Redis memory per stored message (MEMORY USAGE / ZCARD, "
            f"{results['sizes']['unspool']:,} messages): " + "; ".join(parts) + "."
        )
    stall = results.get("stall", {})
    for name in IMPLS:
        if name in stall:
            s = stall[name]
            latency = "n/a" if s["latency_max_ms"] is None else f"{s['latency_max_ms']:.0f} ms"
            events = (
                ", ".join(f"{k} {v} ms" for k, v in s["latency_events"].items()) or "none ≥ 1 ms"
            )
            lines.append(
                f"{bullet}Prune by {name} under a PING loop: took {s['seconds'] * 1000:,.0f} ms, "
                f"slowest of {s['pings']:,} PINGs {s['ping_max_ms']:.2f} ms, "
                f"LATENCY LATEST max {latency} ({events})."
            )
    if "broadcast_many:article" in results["notes"]:
        lines.append(
            f"{bullet}* article has no broadcast_many; "
            f"{results['notes']['broadcast_many:article']}."
        )
    payload = results["payload"]
    lines.append(
        f"{bullet}Payload: a chat message, {payload['content_bytes']} bytes as json.dumps content, "
        f"{payload['stored_bytes']} bytes stored with its envelope."
    )
    env = results["environment"]
    lines.append(
        f"{bullet}Run: {env['date']}, Redis {env['redis']}, Python {env['python']}, "
        f"redis-py {env['redis_py']} + hiredis, {env['machine']}; "
        f"best of {results['sizes']['repeat']}; load average "
        f"{env['load_average_start'][0]:.1f} at the start, "
        f"{env.get('load_average_end', [0])[0]:.1f} at the end."
    )
    return "\n".join(lines)


def limit_lines(results: dict[str, Any], bullet: str) -> list[str]:
    """The limits behind the targets that no client reaches, measured in the same run."""
    w = results["workloads"]
    limits = results.get("limits", {})
    lines = []
    empty = limits.get("empty_call_threads", {})
    if "replaylog" in empty and "peer" in empty:
        threads = results["sizes"]["threads"]
        wanted = w["broadcast_threads"]["peer"] / 5
        script = 1 / results.get("floors", {}).get("ceiling_msgs_per_s", float("inf"))
        lines.append(
            f"{bullet}{threads} threads making empty calls (unspool of a missing log, about "
            f"1 µs of Redis): replaylog {us(empty['replaylog'])} µs, peer {us(empty['peer'])} µs "
            f"per call. 5× the peer's {threads}-thread broadcast is {us(wanted)} µs per message; "
            f"the script alone costs Redis {us(script)} µs of it (the ceiling), and the threads "
            f"alone cost replaylog {us(empty['replaylog'])} µs."
        )
    reply = limits.get("reply_bytes")
    if reply is not None and "objects_dicts" in limits:
        wanted = w["unspool"]["peer"] / 4
        lines.append(
            f"{bullet}unspool: 4× the peer is {us(wanted)} µs per message. Creating the same "
            f"dicts with marshal.loads (CPython's fastest built-in deserializer, no text to "
            f"parse) takes {us(limits['objects_dicts'])} µs per message, and the reply's bytes "
            f"arrive (read off a socket, unparsed) at {us(reply)} µs per message; replaylog's "
            f"whole unspool takes {us(w['unspool']['replaylog'])} µs."
        )
    if reply is not None and "objects_str" in limits:
        wanted = w["unspool_raw"]["peer"] / 8
        lines.append(
            f"{bullet}unspool(raw=True): 8× the peer is {us(wanted)} µs per message, but the "
            f"reply's bytes alone arrive at {us(reply)} µs per message (creating the str with "
            f"marshal.loads: {us(limits['objects_str'])} µs): no client gets past "
            f"{w['unspool_raw']['peer'] / reply:.2f}× the peer's speed."
        )
    bare = limits.get("sporadic_bare")
    if bare is not None:
        peer = w["sporadic"]["peer"]
        lines.append(
            f"{bullet}broadcast 20–200 ms apart: 2× the peer's median is {us(peer / 2)} µs. The "
            f"same EVALSHA, built beforehand and sent on a plain socket (no client library), "
            f"takes {us(bare['median'])} µs median ({us(bare['p99'])} µs p99, "
            f"{us(bare['cpu'])} µs of CPU) after the same pauses: no client gets past "
            f"{peer / bare['median']:.2f}× the peer's median; replaylog takes "
            f"{us(w['sporadic']['replaylog'])} µs."
        )
    return lines


BAR_STEP = 0.1  # one █ per 0.1×
BAR_MAX = 4.0  # longer bars are cut here and end in ▶
EIGHTHS = ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")


def bar(value: float) -> str:
    full, eighths = divmod(round(min(value, BAR_MAX) / BAR_STEP * 8), 8)
    return "█" * full + EIGHTHS[eighths] + ("▶" if value > BAR_MAX else "")


def ratio_bars(results: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """How many times longer the article and the peer take than replaylog, as text bars; for
    the sporadic median, also the peer against the bare socket: the most any client gets."""
    w = results["workloads"]
    rows: list[tuple[str, str, float]] = []
    for key, label, _ in workloads(results):
        if keys is not None and key not in keys:
            continue
        cells = w.get(key, {})
        for name in ("article", "peer"):
            value = ratio(cells.get(name), cells.get("replaylog"))
            if value is not None:
                rows.append((label, f"{name} / replaylog", value))
        bare = results.get("limits", {}).get("sporadic_bare")
        if key == "sporadic" and bare and cells.get("peer"):
            rows.append((label, "peer / bare socket", cells["peer"] / bare["median"]))
    label_width = max(len(label) for label, _, _ in rows)
    what_width = max(len(what) for _, what, _ in rows)
    bar_width = round(BAR_MAX / BAR_STEP) + 1
    lines, previous = [], None
    for label, what, value in rows:
        shown = label if label != previous else ""
        previous = label
        lines.append(
            f"{shown:<{label_width}}  {what:<{what_width}}  {bar(value):<{bar_width}} {value:.2f}×"
        )
    return "\n".join(lines)


def console(results: dict[str, Any]) -> str:
    title = "replaylog benchmark" + (
        " (smoke: tiny sizes, targets not meaningful)" if results["smoke"] else ""
    )
    parts = [
        title,
        "",
        main_table(results, markdown=False),
        "",
        "Client CPU (user + system of the calling processes, all their threads):",
        cpu_table(results, markdown=False),
        "",
        "Busy polling (replaylog's default against busy_poll_us=200):",
        polling_table(results, markdown=False),
        "",
        "Times longer than replaylog takes (█ = 0.1×):",
        ratio_bars(results),
        "",
        extras(results, markdown=False),
    ]
    if not results["smoke"]:
        parts += ["", targets_table(results, markdown=False)]
    return "\n".join(parts)


def headline(results: dict[str, Any]) -> str:
    w = results["workloads"]
    parts = []
    for key, label, _ in workloads(results):
        cells = w.get(key, {})
        peer = ratio(cells.get("peer"), cells.get("replaylog"))
        article = ratio(cells.get("article"), cells.get("replaylog"))
        parts.append(f"{label}: {times(peer)} vs peer, {times(article)} vs article")
    return (
        "Headline (peer or article time / replaylog time, from `.venv/bin/python -m bench`): "
        + "; ".join(parts)
        + "."
    )


def markdown(results: dict[str, Any]) -> str:
    parts = [
        headline(results),
        "",
        "Time per unit in µs (lower is better); ratios are peer time / replaylog time "
        "(above 1× means replaylog is faster).",
        "",
        main_table(results, markdown=True),
        "",
        "The same as bars: how many times longer the article and the peer take than replaylog "
        "(█ = 0.1×, cut at 4× with ▶); for the sporadic median, also the peer against a bare "
        "socket, the most any client gets there.",
        "",
        "```",
        ratio_bars(results),
        "```",
        "",
        "Client CPU per unit in µs: user + system time of the process (or, for the processes "
        "workload, the worker processes) that made the calls, all its threads; Redis's own CPU "
        "is not in it. Ratios above 1× mean replaylog uses less.",
        "",
        cpu_table(results, markdown=True),
        "",
        "Busy polling: replaylog's default (no polling) against `busy_poll_us=200` (the default "
        "before issue 13), both measured in this run. Ratios above 1× mean polling costs more.",
        "",
        polling_table(results, markdown=True),
        "",
        extras(results, markdown=True),
    ]
    if not results["smoke"]:
        parts += [
            "",
            "Targets of issue 3, from this run:",
            "",
            targets_table(results, markdown=True),
        ]
    parts += ["", "![per-message cost by workload and implementation](results.png)"]
    return "\n".join(parts)


def update_readme(text: str, section: str) -> str:
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = workloads(results)
    colors = {"article": "#b0b0b0", "peer": "#4c78a8", "replaylog": "#e45756"}
    fig, ax = plt.subplots(figsize=(14, 5.6), dpi=120)
    width = 0.27
    for offset, name in enumerate(IMPLS):
        xs, ys = [], []
        for index, (key, _, _) in enumerate(shown):
            value = results["workloads"].get(key, {}).get(name)
            if value:
                xs.append(index + (offset - 1) * width)
                ys.append(value * 1e6)
        bars = ax.bar(xs, ys, width, label=name, color=colors[name])
        for bar, (key, _, _) in zip(
            bars, [w for w in shown if results["workloads"].get(w[0], {}).get(name)]
        ):
            if name == "article" and key == "broadcast_many":
                bar.set_hatch("//")  # a stand-in: the article has no broadcast_many
        for bar, y in zip(bars, ys):
            label = f"{y:.0f}" if y >= 10 else f"{y:.2g}"
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    cpu = results.get("redis_cpu", {})
    floor_x = [
        i + width for i, (key, _, _) in enumerate(shown) if cpu.get(key, {}).get("replaylog")
    ]
    floor_y = [
        cpu[key]["replaylog"] * 1e6 for key, _, _ in shown if cpu.get(key, {}).get("replaylog")
    ]
    ax.scatter(
        floor_x,
        floor_y,
        marker="_",
        s=400,
        color="black",
        zorder=3,
        label="Redis CPU per unit (replaylog)",
    )
    rtt = results.get("floors", {}).get("rtt_p50_us")
    if rtt:
        ax.axhline(
            rtt, color="black", linestyle=":", linewidth=1, label=f"bare RTT p50 {rtt:.0f} µs"
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(
        [textwrap.fill(f"{label} (per {unit})", 18) for _, label, unit in shown], fontsize=8
    )
    ax.set_ylabel("µs per unit (log scale, lower is better)")
    ax.set_title("replaylog vs the article's code and a strong Python peer")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
