"""The test suite's time per file, from pytest's `--durations=0` report, for one run or two side by
side (before / after a change). Setup, call and teardown of every test are summed by file; a
session fixture's time lands on the first test that needed it.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest --durations=0 -q > before.log
    ...change...
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest --durations=0 -q > after.log
    python benchmarks/suite_durations.py before.log after.log
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

# (a line may start with its group, "[1/2] ", when make test ran the suite as parallel sessions)
LINE = re.compile(r"^(?:\[\d+/\d+\] )?\s*(\d+(?:\.\d+)?)s\s+(setup|call|teardown)\s+(\S+?\.py)::")
SUMMARY = re.compile(r"^(?:\[\d+/\d+\] )?=*\s*(\d+) passed.* in ([\d.]+)s")
WALL = re.compile(r"make test: pytest exited \d+ after .* \((\d+) s\)")


def per_file(path: str) -> tuple[dict[str, float], str]:
    totals: dict[str, float] = defaultdict(float)
    sessions, wall = [], None
    with open(path, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if m:
                totals[m.group(3)] += float(m.group(1))
            s = SUMMARY.search(line)
            if s:
                sessions.append((int(s.group(1)), float(s.group(2))))
            w = WALL.search(line)
            if w:
                wall = int(w.group(1))
    summary = "?"
    if sessions:
        summary = f"{sum(n for n, _ in sessions)} passed in {max(t for _, t in sessions):.0f} s"
        if len(sessions) > 1:
            summary += f" ({len(sessions)} sessions at once: {', '.join(f'{t:.0f} s' for _, t in sessions)})"
    if wall is not None:
        summary += f"; make test's wall time {wall} s"
    return dict(totals), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="one or two pytest logs written with --durations=0")
    args = ap.parse_args()
    runs = [per_file(p) for p in args.logs[:2]]
    files = sorted({f for totals, _ in runs for f in totals}, key=lambda f: -runs[0][0].get(f, 0.0))
    names = [p.rsplit("/", 1)[-1] for p in args.logs[:2]]
    print(f"{'file':42s}" + "".join(f"{n[:12]:>14s}" for n in names) + ("       ratio" if len(runs) == 2 else ""))
    for f in files:
        cells = [totals.get(f, 0.0) for totals, _ in runs]
        ratio = f"{cells[1] / cells[0]:12.2f}" if len(runs) == 2 and cells[0] else ""
        print(f"{f:42s}" + "".join(f"{c:13.1f}s" for c in cells) + ratio)
    sums = [sum(totals.values()) for totals, _ in runs]
    print(f"{'sum of test durations':42s}" + "".join(f"{c:13.1f}s" for c in sums)
          + (f"{sums[1] / sums[0]:12.2f}" if len(runs) == 2 and sums[0] else ""))
    for name, (_, summary) in zip(names, runs):
        print(f"{name}: {summary}")


if __name__ == "__main__":
    main()
