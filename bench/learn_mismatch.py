"""Which training/inference disagreements collapse the learn config's score: trains `jobs/configs/learn.yaml` once
into --work (reused when there), then scores its adapters with each disagreement injected, through the same in-process
inference as `tests/test_learn.py` (its ``_infer_and_score``). Prints a table; the raw JSON goes to --out.

    python bench/learn_mismatch.py --work /tmp/learn-mismatch --out bench/results/<date>-learn-mismatch
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@contextlib.contextmanager
def patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def variants():
    from mecpe import prompts
    from mecpe.prompts import PromptBuilder
    from test_learn import _neighbour as neighbour

    em_block, ca_block = prompts.emotion_block, prompts.cause_block
    em_q, em_t, ca_q = prompts.emotion_question, prompts.emotion_target, prompts.cause_question
    ep, cp = PromptBuilder.emotion_prompt, PromptBuilder.cause_prompt
    shift = lambda u: type("Shifted", (), {"id": u.id + 1, "speaker": u.speaker, "text": u.text})()  # noqa: E731
    return {
        "none (as trained)": contextlib.nullcontext(),
        "lines relabelled utterance_{N+1}, question unchanged": patched(
            prompts, emotion_block=lambda u: em_block(shift(u)), cause_block=lambda u, e: ca_block(shift(u), e)),
        "question and answer about N+1 over N's prompt": patched(
            prompts, emotion_question=lambda i: em_q(i + 1), emotion_target=lambda i, lab: em_t(i + 1, lab),
            cause_question=lambda i, e: ca_q(i + 1, e)),
        "prompts built for the neighbouring utterance (tests/test_learn.py)": patched(
            PromptBuilder, emotion_prompt=lambda self, conv, uid: ep(self, conv, neighbour(conv, uid)),
            cause_prompt=lambda self, conv, uid, emo: cp(self, conv, neighbour(conv, uid), emo)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    overrides = [f"data.data_dir={work}/synth", f"model.base={work}/tiny", f"output_dir={work}/out",
                 f"storage.path={work}/out/runs"]
    config = str(REPO / "jobs/configs/learn.yaml")
    if not (work / "out" / "pipeline.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "mecpe"), "pipeline", "--config", config, *overrides],
                       cwd=REPO, check=True)
    from mecpe.config import load_config
    from test_learn import _infer_and_score

    cfg = load_config(config, overrides)
    run = json.loads((work / "out" / "pipeline.json").read_text())
    cfg.inference.emotion_adapter, cfg.inference.cause_adapter = run["adapters"]["emotion"], run["adapters"]["cause"]
    rows = {}
    for name, ctx in variants().items():
        with ctx:
            rows[name] = round(_infer_and_score(cfg), 4)
    print("| disagreement injected at inference | weighted_f1 |\n|---|---|")
    for name, f1 in rows.items():
        print(f"| {name} | {f1:.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    (out / "learn_mismatch.json").write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "commit": commit.strip(), "config": "jobs/configs/learn.yaml",
         "weighted_f1": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
