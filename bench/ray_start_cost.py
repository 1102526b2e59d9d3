"""What a fresh Ray process costs on this machine (issue #27: the suite is CPU-bound on 2 cores): a local
``ray.init``, the first task in a new worker process that imports what every mecpe training worker and predictor
actor imports (torch, transformers, peft), and ``ray.shutdown``. Prints one line per repeat.

    OMP_NUM_THREADS=1 python bench/ray_start_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    @ray.remote
    def heavy_imports() -> float:
        t = time.perf_counter()
        import peft  # noqa: F401  (imports torch and transformers)

        return time.perf_counter() - t

    print(f"{'repeat':>6}{'init s':>9}{'first task s':>14}{'imports in it s':>17}{'shutdown s':>12}")
    for k in range(args.repeats):
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False)
        t1 = time.perf_counter()
        inside = ray.get(heavy_imports.remote())
        t2 = time.perf_counter()
        ray.shutdown()
        t3 = time.perf_counter()
        print(f"{k:>6}{t1 - t0:>9.1f}{t2 - t1:>14.1f}{inside:>17.1f}{t3 - t2:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
