"""Benchmarks only, loaded at start-up by every Python process of a benchmark's Ray cluster (the Ray Train workers
included): ``bench/bench_train.py`` puts this folder first on the cluster's ``PYTHONPATH`` when asked to.

* ``MECPE_BENCH_GPU_CAP_GIB``: cap the process's CUDA memory (``set_per_process_memory_fraction``) from its first CUDA
  use (``torch.cuda._lazy_call``), to measure what fits a smaller GPU (an A100 40 GB, a T4) on a larger one; the
  allocator then raises "CUDA out of memory" past the cap, as the smaller card would.
* ``MECPE_BENCH_PROFILE_STEPS`` (e.g. ``2-4,40-42``) and ``MECPE_BENCH_PROFILE_DIR``: run those optimizer steps of a
  transformers ``Trainer`` under ``torch.profiler`` and write, per window, the operators' CUDA and CPU time tables.

Processes that never use the GPU or never train are untouched (nothing happens unless the variables are set)."""

import os

_CAP = os.environ.get("MECPE_BENCH_GPU_CAP_GIB")
if _CAP:
    try:
        import torch

        def _cap() -> None:
            device = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(_CAP) * 2**30 / total), device)

        torch.cuda._lazy_call(_cap)
    except Exception as exc:  # noqa: BLE001 - a benchmark aid must never stop a process from starting
        print(f"[benchsite] GPU cap not applied: {exc!r}")

_PROFILE = os.environ.get("MECPE_BENCH_PROFILE_STEPS")
if _PROFILE:
    try:
        import importlib.abc
        import sys

        windows = [tuple(int(x) for x in w.split("-")) for w in _PROFILE.split(",")]
        out_dir = os.environ.get("MECPE_BENCH_PROFILE_DIR", "/tmp/mecpe-profile")

        def _patch(trainer_module) -> None:
            import time

            import torch

            cls = trainer_module.Trainer
            original = cls.training_step
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            state = {"prof": None, "window": None, "t": None}

            def training_step(self, *args, **kwargs):
                step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
                win = next((w for w in windows if w[0] <= step <= w[1]), None)
                if win and state["prof"] is None:
                    sync()
                    state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                       torch.profiler.ProfilerActivity.CUDA])
                    state["prof"].__enter__()
                    state["window"], state["t"] = win, time.perf_counter()
                out = original(self, *args, **kwargs)
                if state["prof"] is not None and step >= state["window"][1]:
                    sync()
                    wall = time.perf_counter() - state["t"]
                    state["prof"].__exit__(None, None, None)
                    w = state["window"]
                    os.makedirs(out_dir, exist_ok=True)
                    ka = state["prof"].key_averages()
                    with open(os.path.join(out_dir, f"steps-{w[0]}-{w[1]}-pid{os.getpid()}.txt"), "w") as fh:
                        fh.write(f"steps {w[0]}-{w[1]}: wall {wall:.3f} s\n")
                        fh.write(ka.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60))
                        fh.write("\n")
                        fh.write(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
                    state["prof"] = None
                return out

            cls.training_step = training_step

        class _Finder(importlib.abc.MetaPathFinder):
            """Patches transformers.trainer right after it is imported (nothing is imported here before that)."""

            def find_spec(self, name, path, target=None):
                if name != "transformers.trainer":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                loader = spec.loader
                exec_module = loader.exec_module

                def patched(module):
                    exec_module(module)
                    _patch(module)

                loader.exec_module = patched
                return spec

        import importlib.util

        sys.meta_path.insert(0, _Finder())
    except Exception as exc:  # noqa: BLE001
        print(f"[benchsite] profiler not set up: {exc!r}")
