"""What Redis itself allows, measured with redis-benchmark against the same server."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

# The seven numbers ending a redis-benchmark --csv row:
# rps, avg, min, p50, p95, p99, max (latencies in ms).
_ROW = re.compile(
    r'^"(?P<test>.*)",'
    + ",".join([f'"(?P<{n}>[0-9.]+)"' for n in ("rps", "avg", "min", "p50", "p95", "p99", "max")])
    + r"\s*$"
)


@dataclass
class Row:
    test: str
    rps: float
    p50_ms: float


@dataclass
class Floors:
    rtt_p50_us: float | None = None
    ping_rows: list[Row] | None = None
    ceiling_msgs_per_s: float | None = None
    note: str = ""


def parse_csv(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines():
        match = _ROW.match(line.strip())
        if match:
            rows.append(Row(match["test"], float(match["rps"]), float(match["p50"])))
    return rows


def _run(url: str, *args: str) -> list[Row]:
    command = ["redis-benchmark", "-u", url, "--csv", "--precision", "3", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    rows = parse_csv(done.stdout)
    if done.returncode != 0 or not rows:
        raise RuntimeError(
            f"{' '.join(command[:8])} ... failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    return rows


def bare_round_trip(url: str, requests: int) -> tuple[float, list[Row]]:
    """p50 of PING from one client, no pipelining, in microseconds (RESP multibulk PING)."""
    rows = _run(url, "-c", "1", "-n", str(requests), "-t", "ping")
    mbulk = [row for row in rows if row.test == "PING_MBULK"] or rows
    return mbulk[0].p50_ms * 1000, rows


def script_ceiling(url: str, sha: str, args: list[str], requests: int) -> float:
    """Messages/s of our broadcast script when Redis is the only limit (64-deep pipelines)."""
    rows = _run(url, "-P", "64", "-n", str(requests), "EVALSHA", sha, *args)
    return rows[0].rps


def available() -> bool:
    return shutil.which("redis-benchmark") is not None
