"""CPU scale of the inference pipeline with the tiny model: corpus size (memory must stay flat) and actor scaling.

For each corpus size (the ECF test set repeated N times with new conversation ids, one JSON Lines file) a fresh
``mecpe infer`` process runs the two stages on CPU actors; this script samples that driver process's resident memory
(the Ray workers are other processes) and reads the per-stage times from its ``summary.json``. Then the 1x corpus
(or ``--actor-scale``) runs with 1, 2, 4, ... emotion and cause actors: efficiency = rate(k) / (k x rate(1)).

    python bench/bench_cpu_scale.py --out OUT [--scales 1,10,100] [--actors 1,2,4,8] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"


def corpus(data: str, copies: int, path: str) -> int:
    """The test set ``copies`` times, ids shifted by 100,000 per copy, gold labels dropped (a raw corpus)."""
    convs = json.load(open(os.path.join(data, TEST_FILE), encoding="utf-8"))
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(copies):
            for c in convs:
                utts = [{key: u[key] for key in ("utterance_ID", "text", "speaker")} for u in c["conversation"]]
                fh.write(json.dumps({"conversation_ID": 100_000 * k + c["conversation_ID"], "conversation": utts})
                         + "\n")
                n += 1
    return n


def run_infer(model: str, inp: str, out: str, overrides: list[str]) -> dict:
    """One ``mecpe infer`` process; returns its summary plus the driver's peak RSS."""
    import psutil

    cmd = [sys.executable, "-m", "mecpe.cli", "infer", "--input", inp, "--output", out,
           f"model.base={model}", "quantization.mode=none", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                break
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    log = proc.communicate()[0]
    t.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    st = summary["this_run"]["stages"]
    return {"conversations": summary["conversations"], "utterances": summary["utterances"],
            "wall_s": round(time.time() - t0, 1), "pipeline_s": summary["this_run"]["pipeline_s"],
            "emotion_actor_s": st["emotion"]["actor_s"], "cause_actor_s": st["cause"]["actor_s"],
            "utt_per_s": summary["this_run"]["utt_per_s"], "driver_peak_mib": round(peak[0] / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    from mecpe.config import DataConfig  # the data folder by mecpe's own rule
    ap.add_argument("--data", default=DataConfig().resolved_dir(),
                    help="ECF folder (default: MECPE_DATA, else ../shared/data/ecf)")
    ap.add_argument("--model", default=None, help="tiny model folder (built into OUT/tiny-model when absent)")
    ap.add_argument("--scales", default="1,10,100")
    ap.add_argument("--actors", default="1,2,4,8")
    ap.add_argument("--actor-scale", type=int, default=1, help="corpus size (x ECF test) for the actor sweep")
    ap.add_argument("--override", action="append", default=[])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = a.model or os.path.join(a.out, "tiny-model")
    if not os.path.exists(os.path.join(model, "config.json")):
        from mecpe.config import DataConfig
        from mecpe.tiny import build_tiny_model

        build_tiny_model(model, [os.path.join(a.data, DataConfig().train_file)])
    res = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "cpus": os.cpu_count(),
           "scales": [], "actors": []}

    def save():
        json.dump(res, open(os.path.join(a.out, "bench_cpu_scale.json"), "w"), indent=1)

    base = ["inference.num_gpus=0", "inference.num_cpus=1", *a.override]
    for n in [int(x) for x in a.scales.split(",") if x]:
        inp = os.path.join(a.out, f"corpus-x{n}.jsonl")
        corpus(a.data, n, inp)
        r = run_infer(model, inp, os.path.join(a.out, f"out-x{n}"), base)
        res["scales"].append({"scale": n, **r})
        save()
    inp = os.path.join(a.out, f"corpus-x{a.actor_scale}.jsonl")
    if not os.path.exists(inp):
        corpus(a.data, a.actor_scale, inp)
    for k in [int(x) for x in a.actors.split(",") if x]:
        r = run_infer(model, inp, os.path.join(a.out, f"out-actors{k}"), [*base, f"inference.num_actors={k}"])
        res["actors"].append({"actors": k, **r})
        save()
    print_table(res)


def print_table(res: dict) -> None:
    print(f"\n{res['date']} {res['cpus']} CPUs  {res['command']}")
    print("| corpus | conversations | utterances | emotion actor s | cause actor s | pipeline s | utt/s | "
          "driver peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["scales"]:
        print(f"| {r['scale']}x ECF test | {r['conversations']} | {r['utterances']} | {r['emotion_actor_s']} | "
              f"{r['cause_actor_s']} | {r['pipeline_s']} | {r['utt_per_s']} | {r['driver_peak_mib']} |")
    if res["actors"]:
        one = res["actors"][0]["utt_per_s"] or 0
        print("\n| actors per stage | utt/s | efficiency |\n|---|---|---|")
        for r in res["actors"]:
            eff = r["utt_per_s"] / (r["actors"] * one) if one else float("nan")
            print(f"| {r['actors']} | {r['utt_per_s']} | {eff:.2f} |")


if __name__ == "__main__":
    main()
