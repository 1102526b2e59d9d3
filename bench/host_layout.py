"""Host time of a label-scoring batch's layout (issue #29): what the actor's CPU does between two GPU forwards while
the GPU waits (``mecpe.engine.scoring._score_batch``: ``packing.layout`` and ``scoring.label_targets``; with
``inference.prefill_attention=ragged`` ``ragged.ragged_layout`` and ``label_targets`` instead), on real
prompts: the first ``--conversations`` ECF test conversations with the tokenizer and prompt settings of a config
(default the SmolLM2 one, whose packaged model gives the tokenizer; no model is run). Not a test: prints a table.

    MECPE_DATA=../shared/data/ecf python bench/host_layout.py [--config FILE] [--conversations 256] [--json FILE]

The batch is built as the emotion stage builds it (``mecpe.predict.label_blocks``, ``inference.max_batch_tokens``
262,144: 256 conversations are one batch). Times are the median of ``--repeats`` runs on the CPU (the device copy is
not included: the layout is made on the host either way)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mecpe import modeling  # noqa: E402
from mecpe.config import load_config  # noqa: E402
from mecpe.engine.packing import batches, layout, segments  # noqa: E402
from mecpe.engine.ragged import ragged_layout  # noqa: E402
from mecpe.engine.scoring import label_targets  # noqa: E402
from mecpe.predict import label_blocks  # noqa: E402
from mecpe.prompts import PromptBuilder  # noqa: E402
from mecpe.readers import read_conversations  # noqa: E402

TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"


def timed(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def ragged_scores(plan) -> float:
    """(query, key) pairs of a ``ragged.RaggedPlan``'s six calls: n^2 / 2 for a causal one, n_q x n_k otherwise."""
    def lens(seqs):
        return [] if seqs is None else [b - a for a, b in zip(seqs.host, seqs.host[1:])]

    def full(qs, ks):
        return sum(a * b for a, b in zip(lens(qs), lens(ks)))

    return (sum(n * n / 2 for s in (plan.prefix, plan.shared_blk, plan.cont) for n in lens(s))
            + full(plan.shared_seg, plan.prefix) + full(plan.cont_seg, plan.prefix) + full(plan.cont_blk, plan.shared_blk))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "jobs/configs/ecf-smollm2.yaml"))
    ap.add_argument("--data", default=os.environ.get("MECPE_DATA", str(REPO.parent / "shared/data/ecf")))
    ap.add_argument("--conversations", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=262144)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cfg = load_config(args.config)
    tok = modeling.load_base_tokenizer(cfg.model, for_inference=True)
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs(), cut_target=True)
    convs = read_conversations(os.path.join(args.data, TEST_FILE)).conversations[:args.conversations]
    items, _, _ = label_blocks(builder, convs)
    batch_list = batches(segments(items, True, args.max_batch_tokens), args.max_batch_tokens)
    cpu = torch.device("cpu")
    rows = []
    for k, batch in enumerate(batch_list):
        lay = layout(batch, 0, cpu)
        plan = ragged_layout(batch, cpu).plan
        rows.append({"batch": k, "rows": lay.ids.shape[0], "columns": lay.ids.numel(), "blocks": len(lay.blocks),
                     "targets": len(lay.targets),
                     "layout_ms": round(1000 * timed(lambda: layout(batch, 0, cpu), args.repeats), 1),
                     "label_targets_ms": round(1000 * timed(lambda: label_targets(lay), args.repeats), 1),
                     # inference.prefill_attention=ragged: the flat layout and its targets instead of both
                     "ragged_ms": round(1000 * timed(lambda: label_targets(ragged_layout(batch, cpu)), args.repeats), 1),
                     # attention scores a forward computes per head and layer: SDPA's masked kernel every (query,
                     # key) of a row; the ragged calls their own pairs (causal ones about half)
                     "dense_scores_M": round(lay.ids.shape[0] * lay.ids.shape[1] ** 2 / 1e6, 1),
                     "ragged_scores_M": round(ragged_scores(plan) / 1e6, 1)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    out = {"commit": commit.strip(), "dirty": dirty, "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "config": args.config,
           "conversations": len(convs), "utterances": len(items), "repeats": args.repeats, "batches": rows}
    print(f"# host_layout at {out['commit']}{' (dirty)' if dirty else ''}: {len(convs)} ECF test conversations, "
          f"{len(items)} utterances, {out['cpus']} CPUs, median of {args.repeats}")
    print(f"{'batch':>5} {'rows':>5} {'columns':>8} {'blocks':>6} {'targets':>7} {'layout ms':>10} "
          f"{'targets ms':>10} {'total ms':>9} {'ragged ms':>10} {'dense scores M':>15} {'ragged scores M':>16}")
    for r in rows:
        print(f"{r['batch']:5d} {r['rows']:5d} {r['columns']:8d} {r['blocks']:6d} {r['targets']:7d} "
              f"{r['layout_ms']:10.1f} {r['label_targets_ms']:10.1f} {r['layout_ms'] + r['label_targets_ms']:9.1f} "
              f"{r['ragged_ms']:10.1f} {r['dense_scores_M']:15.1f} {r['ragged_scores_M']:16.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
