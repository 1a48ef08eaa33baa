"""How busy the machine's cores are while a command runs, from /proc/stat before and after:
the figure that says whether running work side by side can gain (idle cores) or not.

    .venv/bin/python benchmarks/cpu_busy.py -- .venv/bin/python -m pytest tests/test_restart.py -q

Prints one table row: wall seconds, cores, busy share of all cores, and the command's exit code.
Run it with the machine otherwise quiet: it counts every process, not only the command's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def cpu_times() -> tuple[int, int]:
    """(busy, idle) jiffies of all cores since boot (idle includes iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, idle


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit(__doc__)
    busy0, idle0 = cpu_times()
    start = time.monotonic()
    code = subprocess.call(args)
    wall = time.monotonic() - start
    busy1, idle1 = cpu_times()
    busy, idle = busy1 - busy0, idle1 - idle0
    print(f"{'wall s':>8} {'cores':>6} {'busy':>6} {'exit':>5}  command")
    print(f"{wall:8.0f} {os.cpu_count():6d} {busy / max(busy + idle, 1):6.0%} {code:5d}  {' '.join(args)[:80]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
