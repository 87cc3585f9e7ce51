"""Instructions per broadcast, from callgrind: ``.venv/bin/python -m bench.callgrind [N]``.

Runs a loop of N, then 2N, broadcasts of the benchmark's payload under
``valgrind --tool=callgrind`` against a redis-server of its own, and prints the difference
divided by N, per shared object (user space only: the kernel's share is not counted).
The ``_native`` row is replaylog's Rust code, including the tokio runtime and redis-rs.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.server import RedisServer

LOOP = """
import os, sys
sys.path.insert(0, {root!r})
import replaylog
from bench.payload import chat_message
log = replaylog.ReplayLog(os.environ["BENCH_URL"], expire_ms=3_600_000)
content = chat_message(0)
broadcast = log.broadcast
for _ in range(20):
    broadcast("warm-up", "message", content)
for _ in range(int(os.environ["BENCH_N"])):
    broadcast("callgrind", "message", content)
"""

LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+.*:(.*) \[(.*)\]$")


def per_object(path: Path) -> collections.Counter[str]:
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    totals: collections.Counter[str] = collections.Counter()
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            totals[Path(match[3]).name] += int(match[1].replace(",", ""))
    return totals


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.callgrind: {tool} is not on PATH")
    root = str(Path(__file__).resolve().parent.parent)
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "loop.py"
        script.write_text(LOOP.format(root=root))
        counts = {}
        for runs in (n, 2 * n):
            out = Path(tmp) / f"callgrind.{runs}.out"
            # Polling for the reply spins for as long as the reply takes (much longer under
            # valgrind): waiting, not work, and it would make the count vary from run to run.
            env = {
                **os.environ,
                "BENCH_URL": server.url,
                "BENCH_N": str(runs),
                "REPLAYLOG_BUSY_POLL_US": "0",
            }
            subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
                + [str(script)],
                env=env,
                check=True,
                capture_output=True,
            )
            counts[runs] = per_object(out)
    objects = set(counts[n]) | set(counts[2 * n])
    diff = {name: (counts[2 * n][name] - counts[n][name]) / n for name in objects}
    print(f"callgrind instructions per broadcast ({n} vs {2 * n} broadcasts, user space):")
    for name, value in sorted(diff.items(), key=lambda item: -item[1]):
        if abs(value) >= 10:
            print(f"  {value:10,.0f}  {name}")
    print(f"  {sum(diff.values()):10,.0f}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
