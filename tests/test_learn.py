"""The pipeline learns: `jobs/configs/learn.yaml` trains both adapters on the synthetic corpus (mecpe.synth) and the
official metric on its test set clears 0.8; the same adapters fed another prompt template, or prompts built for another
utterance than the one their answers are filed under, fall below 0.3, so a mismatch between training and inference
cannot pass this file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PASS, MISMATCH = 0.8, 0.3


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One run of the learn config, every path under a temporary folder (the corpus and the tiny model built there)."""
    tmp = tmp_path_factory.mktemp("learn")
    # validation.score: the validation step too (not in the config: ~15 s more of README command 1)
    overrides = [f"data.data_dir={tmp}/synth", f"model.base={tmp}/tiny", f"output_dir={tmp}/out",
                 f"storage.path={tmp}/out/runs", "validation.score=true"]
    # as a user runs it: torch's threads per core, not the suite's one per process (conftest.py), since this run
    # has the machine to itself (its prepare step pretrains the tiny model in one process)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([str(BIN / "mecpe"), "pipeline", "--config", str(REPO / "jobs/configs/learn.yaml"),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from mecpe.config import load_config

    cfg = load_config(str(REPO / "jobs/configs/learn.yaml"), overrides)
    run = json.loads((tmp / "out" / "pipeline.json").read_text())
    cfg.inference.emotion_adapter, cfg.inference.cause_adapter = run["adapters"]["emotion"], run["adapters"]["cause"]
    return {"cfg": cfg, "stdout": proc.stdout, "metrics": json.loads((tmp / "out" / "metrics.json").read_text()),
            "run": run}


def test_learn_config_reaches_the_bar(learned):
    m = learned["metrics"]
    assert m["weighted_f1"] >= PASS, m
    majority = m["baselines"]["majority emotion + self/previous causes"]["weighted_f1"]
    assert m["weighted_f1"] > majority
    summary = json.loads(Path(learned["run"]["inference_summary"]).read_text())
    assert summary["this_run"]["stages"]["cause"]["utterances"] > 0
    assert "cause stage: " in learned["stdout"] and "weighted_f1" in learned["stdout"]
    assert (Path(learned["cfg"].output_dir) / "learning_curves.png").stat().st_size > 0
    assert set(m["adapters"]) == {"emotion", "cause"}


def test_validation_step_puts_the_rule_beside_the_system(learned):
    """validation.score: the validation split scored (where choices are made) and, beside the system, its own
    emotions with the rule's causes (what the cause stage must beat), from its prediction and gold files; the test
    report holds the same comparison among its baselines."""
    from mecpe.evaluate import OWN_EMOTIONS_RULE, rule_on_own_emotions
    from mecpe.layout import RunLayout

    val = learned["run"]["validation"]
    out = RunLayout(learned["cfg"].output_dir).validation_inference
    pred, gold = (json.loads(Path(uri).read_text()) for uri in (out.pred, out.gold))
    assert val["metrics"]["weighted_f1"] >= PASS
    assert val["rule_on_own_emotions"] == rule_on_own_emotions(pred, gold).weighted_f1 > 0
    assert f"rule's causes instead of the cause stage's: {val['rule_on_own_emotions']:.4f}" in learned["stdout"]
    assert OWN_EMOTIONS_RULE in learned["metrics"]["baselines"]


def _infer_and_score(cfg) -> float:
    """Both stages in this process with the trained adapters (the stages' own library calls), official metric."""
    from mecpe import data, modeling, predict, storage
    from mecpe.metric import score_subtask2
    from mecpe.prompts import PromptBuilder

    gold = storage.read_json(cfg.data.path(cfg.data.test_file))
    convs = [data.conversation_from_json(r, source="test.json", location=str(i)) for i, r in enumerate(gold)]
    model, tok = modeling.load(cfg.model, cfg.quantization, device="cpu",
                               adapters={"emotion": cfg.inference.emotion_adapter, "cause": cfg.inference.cause_adapter})
    builder = PromptBuilder(tok, **cfg.prompt.builder_kwargs(), cut_target=True)
    model.set_adapter("emotion")
    emo = predict.predict_emotions(model, tok, builder, convs).results
    labels = []
    for conv, res in zip(convs, emo):
        got = {u: r.label for u, r in res.items()}
        labels.append({u.id: got.get(u.id, "neutral") for u in conv.utterances})
    model.set_adapter("cause")
    causes = predict.predict_causes(model, tok, builder, convs, labels).results
    pred = []
    for conv, lab, cau in zip(convs, labels, causes):
        pairs = [data.Pair(u, lab[u], int(c)) for u in sorted(cau) if lab[u] != "neutral" for c in cau[u].causes]
        pred.append(data.conversation_to_json(conv, emotions=lab, pairs=pairs))
    return score_subtask2(pred, gold)["weighted_f1"]


def test_in_process_inference_agrees_with_the_pipeline(learned):
    assert _infer_and_score(learned["cfg"]) == pytest.approx(learned["metrics"]["weighted_f1"], abs=0.02)


def test_another_prompt_template_falls_below_the_bar(learned, monkeypatch):
    """Question and answer template of another wording. Measured 2026-11-29: this gives 0.19; the learned rule (the
    cue word of the target line) survives milder changes: other line format 0.91, other answer format alone 0.86, no
    chat template 0.59."""
    from mecpe import prompts

    monkeypatch.setattr(prompts, "emotion_question", lambda i: f"How does the speaker of line {i} feel? One word.")
    monkeypatch.setattr(prompts, "emotion_target", lambda i, label: f"line {i} = {label}")
    monkeypatch.setattr(prompts, "cause_question",
                        lambda i, e: f"Line {i} feels {e}. Which lines made it so? List their numbers.")
    assert _infer_and_score(learned["cfg"]) < MISMATCH


def _neighbour(conv, uid: int) -> int:
    """The utterance after ``uid`` in its conversation (the last one's: the one before it)."""
    ids = [u.id for u in conv.utterances]
    k = ids.index(uid)
    return ids[k + 1] if k + 1 < len(ids) else ids[k - 1] if k else uid


def test_answers_filed_under_the_neighbouring_utterance_fall_below_the_bar(learned, monkeypatch):
    """A disagreement inside the pipeline: inference builds each utterance's prompts (both stages) for the utterance
    after it (the last one: before it) and files the answers under the utterance it asked about. A model that ignored
    which utterance its prompt is about, or a pipeline that kept answers apart from their utterances, would keep its
    score and fail this test.

    Milder disagreements do not collapse the score (`bench/learn_mismatch.py`, 2026-12-02: as trained 0.99, this
    test's 0.12; lines relabelled ``utterance_{N+1}`` with the question unchanged 0.90; questions and answers of both
    stages about N+1 over N's prompt 0.48): the learn config's prompt budget cuts most conversations after the target
    utterance, so the tiny model learned to answer for the last line shown, whatever ids are written."""
    from mecpe.prompts import PromptBuilder

    emotion_prompt, cause_prompt = PromptBuilder.emotion_prompt, PromptBuilder.cause_prompt
    monkeypatch.setattr(PromptBuilder, "emotion_prompt",
                        lambda self, conv, uid: emotion_prompt(self, conv, _neighbour(conv, uid)))
    monkeypatch.setattr(PromptBuilder, "cause_prompt",
                        lambda self, conv, uid, emotions: cause_prompt(self, conv, _neighbour(conv, uid), emotions))
    assert _infer_and_score(learned["cfg"]) < MISMATCH
