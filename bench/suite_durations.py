"""Per-test and per-file wall time of a pytest run, from its ``--durations`` table (setup + call + teardown summed),
and, given a second log, the same tests side by side. A script that prints a table (not a timed test).

    python bench/suite_durations.py NEW.txt [--before OLD.txt] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)", re.M)


def durations(log: str) -> tuple[collections.Counter, collections.Counter]:
    """(seconds per test id without parameters, seconds per file) from a pytest log's durations table."""
    tests, files = collections.Counter(), collections.Counter()
    for m in LINE.finditer(log):
        nodeid = m.group(2)
        tests[nodeid.split("[")[0]] += float(m.group(1))
        files[nodeid.split("::")[0]] += float(m.group(1))
    return tests, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--before", help="an earlier run's log, shown beside")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    new_t, new_f = durations(Path(a.log).read_text())
    old_t, old_f = durations(Path(a.before).read_text()) if a.before else (collections.Counter(), collections.Counter())
    head = f"{'s':>8} {'before':>8}  " if a.before else f"{'s':>8}  "
    for title, new, old in (("file", new_f, old_f), ("test", new_t, old_t)):
        print(f"{head}{title}")
        for key, sec in new.most_common(a.top):
            print(f"{sec:8.1f} {old[key]:8.1f}  {key}" if a.before else f"{sec:8.1f}  {key}")
        total = f"{sum(new.values()):8.1f} {sum(old.values()):8.1f}" if a.before else f"{sum(new.values()):8.1f}"
        print(f"{total}  (all)\n")


if __name__ == "__main__":
    main()
