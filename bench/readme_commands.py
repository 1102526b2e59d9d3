"""Time the README's first set-up command as a newcomer runs it: a fresh clone next to this repository (so the data
folder ``../shared/data/ecf`` resolves as in the README), then each part of the command's ``a && b && ...`` list in
turn, timed. Prints a table and writes the raw JSON (and the full log) to --out.

    python bench/readme_commands.py --out bench/results/<date>-readme
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_command(number: int) -> str:
    """The README's set-up command ``number`` (1 or 2): the line after its ``# <number>.`` comment."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[number - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", type=int, default=1, help="which README command (1: demo, 2: tests)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clone = REPO.parent / f"readme-check-{os.getpid()}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    parts = readme_command(args.command).split(" && ")
    results = []
    try:
        with open(out / "readme_commands.log", "w") as log:
            for part in parts:
                t0 = time.monotonic()
                proc = subprocess.run(["bash", "-c", part], cwd=clone, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                log.write(f"$ {part}\n{proc.stdout}\n")
                lines = proc.stdout.splitlines()
                shown = [ln.strip() for ln in lines if ln.startswith("== ") or ln.startswith("cause stage:")
                         or re.match(r"\s+weighted_f1\s", ln)]
                results.append({"part": part, "seconds": round(time.monotonic() - t0, 1), "rc": proc.returncode,
                                "shown": shown})
                if proc.returncode:
                    break
    finally:
        shutil.rmtree(clone, ignore_errors=True)
    report = {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "command": args.command,
              "cpus": os.cpu_count(), "parts": results,
              "total_s": round(sum(r["seconds"] for r in results), 1)}
    (out / "readme_commands.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['date']}  commit {report['commit']}  README command {args.command}  {report['cpus']} CPUs")
    print("| part | seconds | exit |\n|---|---|---|")
    for r in results:
        print(f"| `{r['part'][:90]}` | {r['seconds']} | {r['rc']} |")
    print(f"| total | {report['total_s']} | |")
    for r in results:
        for line in r["shown"]:
            print("  " + line)


if __name__ == "__main__":
    main()
