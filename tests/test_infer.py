"""Two-stage batch inference with Ray Data (mecpe.infer): end to end on real ECF conversations with the tiny model,
S3 in and out, bad input, crash + resume, refusal to mix runs. A real local Ray (2 CPUs) for the whole module."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from _tiny import REPO, tiny_model_dir

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

SEVEN = {"neutral", "anger", "disgust", "fear", "joy", "sadness", "surprise"}
TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A real local Ray; started after the S3 fixture so its workers inherit the S3 endpoint and credentials."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny() -> str:
    return tiny_model_dir()


@pytest.fixture(scope="module")
def gold40(data_dir) -> list[dict]:
    return json.loads((data_dir / TEST_FILE).read_text(encoding="utf-8"))[:40]


@pytest.fixture(scope="module")
def input40(tmp_path_factory, gold40) -> Path:
    path = tmp_path_factory.mktemp("in40") / "test40.json"
    path.write_text(json.dumps(gold40), encoding="utf-8")
    return path


def make_cfg(base: str, **inference):
    from mecpe.config import Config

    # one actor for both stages, as every real-model config runs (jobs/configs): a predictor actor's start (imports,
    # model load) is ~5 s of CPU on this machine; the baseline runs the two stages as separate actors
    inf = {"batch_size": 8, "num_actors": 1, "num_cpus": 0.5, "share_base": True, **inference}
    return Config.model_validate({"model": {"base": base}, "quantization": {"mode": "none"},
                                  "prompt": {"max_prompt_tokens": 512}, "inference": inf})


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny, input40, tmp_path_factory):
    """One uninterrupted run on the 40 conversations (separate emotion and cause actors, no adapters)."""
    from mecpe.infer import run_inference

    out = tmp_path_factory.mktemp("baseline") / "out"
    summary = run_inference(make_cfg(tiny, share_base=False), str(input40), str(out))
    return out, summary


def read_shards(out: Path, sub: str = "records") -> list[dict]:
    return [json.loads(line) for f in sorted((out / sub).glob("*.jsonl")) for line in f.read_text().splitlines()]


def predictions(out: Path) -> dict:
    """conversation id -> (emotions per utterance, sorted pairs) of Subtask_2_pred.json."""
    pred = json.loads((out / "Subtask_2_pred.json").read_text())
    return {c["conversation_ID"]: ([u["emotion"] for u in c["conversation"]],
                                   sorted(map(tuple, c["emotion-cause_pairs"]))) for c in pred}


# ------------------------------------------------------------------------------------------------ pure parts


def test_parse_stage_rows_to_conversations_or_rejects():
    from mecpe.infer.source import RAW_SCHEMA
    from mecpe.infer.rows import ROW_SCHEMA, conversation_of
    from mecpe.infer.stages import ParseStage

    good = {"conversation_ID": 7, "conversation": [{"utterance_ID": 1, "text": "Hi .", "speaker": "Ross"}]}

    def raw(source, kind, pos, loc, data):
        return {"source": source, "file_index": 0, "kind": kind, "position": pos, "location": loc, "raw": data}

    rows = [
        raw("a.jsonl", "line", 3, "line 3", json.dumps(good).encode()),
        raw("a.jsonl", "line", 4, "line 4", b'{"conversation_ID": 8, '),
        raw("a.jsonl", "line", 5, "line 5", b'{"conversation_ID": 5, "x": "\xff\xfe"}'),
        raw("b.json", "item", 0, "index 0", json.dumps(good).encode()),
        raw("b.json", "item", 1, "index 1", json.dumps({"conversation_ID": 9, "conversation": "nope"}).encode()),
        raw("b.json", "reject", 2, "index 2", json.dumps({"conversation_id": "10", "reason": "invalid UTF-8",
                                                          "field": None}).encode()),
        raw("c.json", "error", -1, "1:23", b"unreadable file: not valid JSON"),
    ]
    out = ParseStage()(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    assert out.schema == ROW_SCHEMA
    got = out.to_pylist()
    assert [(r["source"], r["location"], r["reject"] is None) for r in got] == [
        ("a.jsonl", "line 3", True), ("a.jsonl", "line 4", False), ("a.jsonl", "line 5", False),
        ("b.json", "index 0", True), ("b.json", "index 1", False), ("b.json", "index 2", False),
        ("c.json", "1:23", False)]
    assert got[0]["key"] == "7" and got[0]["conversation"]["id_int"] == 7
    # the next stages read the typed columns back as the validated conversation, without parsing it again
    conv = conversation_of(got[0])
    assert (conv.id, conv.pairs, [(u.id, u.text, u.speaker, u.emotion) for u in conv.utterances]) == \
        (7, None, [(1, "Hi .", "Ross", None)])
    assert "JSON" in got[1]["reject"]["reason"] and got[1]["reject"]["stage"] == "read"
    assert "UTF-8" in got[2]["reject"]["reason"]
    assert got[4]["conversation_id"] == "9" and got[4]["reject"]["field"] == "conversation"
    assert got[4]["reject"]["stage"] == "validate"
    assert got[5]["conversation_id"] == "10"
    assert "unreadable file" in got[6]["reject"]["reason"]
    assert len({r["uid"] for r in got}) == len(got)


def test_conversation_columns_round_trip():
    """String ids, labels, pairs and unknown utterance fields survive the typed row columns unchanged."""
    from mecpe import data
    from mecpe.infer.rows import ROW_SCHEMA, conversation_of, conversation_row

    raw = {"conversation_ID": "dlg-3", "conversation": [
        {"utterance_ID": 1, "text": "Oh no .", "speaker": "Ross", "emotion": "sadness", "video": {"t": [1, 2]}},
        {"utterance_ID": 2, "text": "Why ?", "speaker": "Rachel", "emotion": "neutral"}],
        "emotion-cause_pairs": [["1_sadness", "1"]]}
    conv = data.conversation_from_json(raw, source="s.json")
    row = {f.name: None for f in ROW_SCHEMA}
    row.update(source="s.json", conversation=conversation_row(conv))
    back = pa.Table.from_pylist([row], schema=ROW_SCHEMA).to_pylist()[0]
    assert conversation_of(back) == conv
    assert data.conversation_to_json(conversation_of(back)) == data.conversation_to_json(conv)


def test_reader_streams_jsonl_lines_and_splits_arrays(ray_cluster, tmp_path):
    """Lines as raw bytes across read chunks (a 200 kB line, CRLF, BOM, blank lines, no final newline), blocks of
    at most ``per_block`` rows; a JSON array split into elements; a truncated array is one error row."""
    from mecpe.infer.source import make_raw_datasource

    conv = {"conversation_ID": 1, "conversation": [{"utterance_ID": 1, "text": "x" * 200_000, "speaker": "A"}]}
    lines = [b"\xef\xbb\xbf" + json.dumps(conv).encode() + b"\r", b"", b"  ", b"\xff broken", b'{"a": 1}']
    jsonl = b"\n".join(lines)  # no newline at the end
    a, b = tmp_path / "in.jsonl", tmp_path / "in.json"
    a.write_bytes(jsonl)
    b.write_text("[]")
    src = make_raw_datasource([("in.jsonl", str(a), 0), ("in.json", str(b), 1)], None, 2)

    def read(data, path):
        return [r for block in src._read_stream(pa.BufferReader(data), path) for r in block.to_pylist()], \
            [block.num_rows for block in src._read_stream(pa.BufferReader(data), path)]

    rows, sizes = read(jsonl, str(a))
    assert [(r["kind"], r["position"], r["location"]) for r in rows] == [
        ("line", 1, "line 1"), ("line", 4, "line 4"), ("line", 5, "line 5")]
    assert json.loads(rows[0]["raw"]) == conv and rows[1]["raw"] == b"\xff broken"
    assert sizes == [2, 1] and {r["source"] for r in rows} == {"in.jsonl"}
    rows, _ = read(json.dumps([conv, 5]).encode(), str(b))
    assert [(r["kind"], r["location"], r["file_index"]) for r in rows] == [("item", "index 0", 1),
                                                                           ("item", "index 1", 1)]
    rows, _ = read(b'[{"conversation_ID": 1', str(b))
    assert [r["kind"] for r in rows] == ["error"] and b"unreadable file" in rows[0]["raw"]


def test_rule_causes_join_the_models_answer():
    """``inference.rule_causes``: each emotional utterance's pairs are the model's causes plus itself and the
    utterance before it, each once; the model's own answer stays in ``model_causes``; neutral utterances get none;
    without rules the pairs are the model's answer alone."""
    from mecpe import data
    from mecpe.infer.rows import ROW_SCHEMA, conversation_row
    from mecpe.infer.writer import build_record

    raw = {"conversation_ID": 7, "conversation": [{"utterance_ID": i, "text": "x", "speaker": "A"} for i in (1, 2, 3)]}
    row = {f.name: None for f in ROW_SCHEMA}
    row.update(uid="u7", key="7", source="s.json", location="index 0", file_index=0, position=0,
               conversation=conversation_row(data.conversation_from_json(raw, source="s.json")),
               emotions=[{"utterance": u, "label": label, "status": "scored", "dropped": 0, "scores": None}
                         for u, label in ((1, "joy"), (2, "neutral"), (3, "anger"))],
               causes=[{"utterance": 1, "emotion": "joy", "causes": [1], "status": "ok", "dropped": 0},
                       {"utterance": 3, "emotion": "anger", "causes": [1], "status": "ok", "dropped": 0}])
    plain = build_record(row)
    assert sorted(plain["emotion-cause_pairs"]) == [["1_joy", "1"], ["3_anger", "1"]]
    assert all("model_causes" not in u for u in plain["conversation"])
    ruled = build_record(row, ("self", "previous"))
    assert sorted(ruled["emotion-cause_pairs"]) == [["1_joy", "1"], ["3_anger", "1"], ["3_anger", "2"],
                                                    ["3_anger", "3"]]
    assert [u.get("model_causes") for u in ruled["conversation"]] == [[1], None, [1]]
    only_self = build_record(row, ("self",))
    assert sorted(only_self["emotion-cause_pairs"]) == [["1_joy", "1"], ["3_anger", "1"], ["3_anger", "3"]]


def test_assemble_dedupes_copies_and_duplicate_ids(tmp_path):
    from mecpe import storage
    from mecpe.infer.resume import META, assemble

    def rec(cid, uid, fi, pos, emo="joy"):
        return {"conversation_ID": cid, "conversation": [
            {"utterance_ID": 1, "text": "x", "speaker": "A", "emotion": emo, "video_name": f"dia{cid}utt1.mp4",
             "parse_status": {"emotion": "scored", "cause": "ok"}, "dropped_utterances": {"emotion": 0, "cause": 0}}],
            "emotion-cause_pairs": [[f"1_{emo}", "1"]],
            META: {"uid": uid, "key": str(cid), "source": f"f{fi}", "location": f"line {pos}", "file_index": fi,
                   "position": pos, "gold": None}}

    def write(sub, name, objs):
        storage.write_bytes(str(tmp_path / sub / name), "".join(json.dumps(o) + "\n" for o in objs).encode())

    write("records", "part-a.jsonl", [rec(2, "u2", 0, 2), rec(1, "u1", 1, 1)])
    write("records", "part-b.jsonl", [rec(2, "u2", 0, 2), rec(1, "u1b", 0, 9, "anger")])  # retried copy + dup id
    write("rejects", "part-a.jsonl", [
        {"uid": "u3", "stage": "cause", "reason": "boom", "retryable": True, "source": "f0", "location": "line 3",
         "conversation_id": "3", "field": None, "key": "3", "file_index": 0, "position": 3},
        {"uid": "u2", "stage": "emotion", "reason": "boom", "retryable": True, "source": "f0", "location": "line 2",
         "conversation_id": "2", "field": None, "key": "2", "file_index": 0, "position": 2}])
    asm = assemble(str(tmp_path))
    pred = json.loads((tmp_path / "Subtask_2_pred.json").read_text())
    assert [r["conversation_ID"] for r in pred] == [1, 2] and asm.conversations == 2
    assert pred[0]["conversation"][0]["emotion"] == "anger"  # file 0 position 9 comes before file 1
    assert META not in pred[0] and "parse_status" not in pred[0]["conversation"][0]
    assert asm.duplicates_in_shards == 1 and asm.utterances == 2 and not asm.has_gold
    assert not (tmp_path / "gold.json").exists()
    reasons = {r["uid"]: r for r in asm.rejects}
    assert set(reasons) == {"u1", "u3"}  # u2's failed attempt is superseded by its record
    assert reasons["u1"]["stage"] == "assemble" and "duplicate conversation_ID" in reasons["u1"]["reason"]
    assert asm.parse_status == {"emotion": {"scored": 2}, "cause": {"ok": 2}}


# ------------------------------------------------------------------------------------------------ with Ray


def test_end_to_end_40_conversations(baseline, gold40):
    from mecpe.metric import score_subtask2

    out, summary = baseline
    pred = json.loads((out / "Subtask_2_pred.json").read_text())
    assert [c["conversation_ID"] for c in pred] == sorted(c["conversation_ID"] for c in gold40)
    n_utts = sum(len(c["conversation"]) for c in gold40)
    assert sum(len(c["conversation"]) for c in pred) == n_utts
    assert all(u["emotion"] in SEVEN for c in pred for u in c["conversation"])
    metrics = score_subtask2(pred, gold40)
    assert 0.0 <= metrics["weighted_f1"] <= 1.0
    # labelled input: the gold labels of the predicted conversations, in prediction order, for mecpe evaluate
    gold_file = json.loads((out / "gold.json").read_text())
    assert summary.has_gold and score_subtask2(pred, gold_file) == metrics
    assert [c["conversation_ID"] for c in gold_file] == [c["conversation_ID"] for c in pred]
    assert not (out / "metrics.json").exists()  # scoring is mecpe evaluate's job, not inference's

    assert summary.conversations == 40 and summary.utterances == n_utts and summary.rejects == 0
    assert sum(summary.parse_status["emotion"].values()) == n_utts
    n_emotional = sum(1 for c in pred for u in c["conversation"] if u["emotion"] != "neutral")
    assert sum(summary.parse_status.get("cause", {}).values()) == n_emotional
    assert summary.this_run.stages.emotion.utterances == n_utts
    assert summary.this_run.stages.emotion.utt_per_s_per_actor > 0
    engine = summary.this_run.engine  # the engine's own counters, summed over the batches
    assert engine["emotion"]["prompts"] == n_utts and engine["cause"]["prompts"] == n_emotional
    assert engine["emotion"]["prefill_s"] > 0 and engine["cause"]["decode_steps"] > 0
    assert len(engine["load_s"]) == 2 and all(s > 0 for s in engine["load_s"])  # one per actor (two stages)
    prov = summary.provenance
    assert prov["base_model"] and prov["mecpe_version"] and len(prov["inputs"][0]["sha256"]) == 64
    assert json.loads((out / "summary.json").read_text())["run_id"] == summary.run_id
    assert (out / "rejects.jsonl").read_text() == ""

    records = read_shards(out)
    assert len(records) == 40 and len({r["_mecpe"]["uid"] for r in records}) == 40
    utt = records[0]["conversation"][0]
    assert utt["video_name"].startswith("dia") and "emotion" in utt["parse_status"]
    assert "emotion" in utt["dropped_utterances"]
    for r in records:  # pairs in the official format, on the predicted emotions
        emos = {u["utterance_ID"]: u["emotion"] for u in r["conversation"]}
        for e, c in r["emotion-cause_pairs"]:
            uid, label = e.split("_")
            assert emos[int(uid)] == label != "neutral" and 1 <= int(c) <= len(emos)


def _make_adapter(base: str, out: Path, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    (out / "mecpe_train.json").write_text(json.dumps({"config_hash": f"cfg-{seed}"}))
    return str(out)


def _peak_rss_growth(fn) -> int:
    """Bytes the driver's resident memory rose above its level at the call's start, at its peak during ``fn``."""
    import threading

    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak, stop = [start], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(peak[0], proc.memory_info().rss) - start


def test_driver_memory_flat_1x_vs_10x(baseline, tiny, gold40, tmp_path):
    """Streaming: the driver's memory does not grow with the corpus. 1x = 8 unlabelled conversations (first 2
    utterances) each carrying a 400 kB extra field that travels into the output records (3.2 MB); 10x = the
    same repeated with new ids (32 MB). Holding the records on the driver at any point, as an in-memory assembly
    of the prediction file would, raises the 10x peak by tens of MB. The module's baseline run came first, so the
    driver's one-time imports and caches are not counted in either."""
    from mecpe.infer import run_inference

    def corpus(n_copies: int) -> Path:
        path = tmp_path / f"x{n_copies}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for k in range(n_copies):
                for j, conv in enumerate(gold40[:8]):
                    utts = [{"utterance_ID": u["utterance_ID"], "text": u["text"], "speaker": u["speaker"]}
                            for u in conv["conversation"][:2]]
                    utts[0]["notes"] = f"{k}-{j}-" + "n" * 400_000
                    fh.write(json.dumps({"conversation_ID": 100_000 * k + conv["conversation_ID"],
                                         "conversation": utts}) + "\n")
        return path

    cfg = make_cfg(tiny)
    growth = {}
    for n in (1, 10):
        out = tmp_path / f"out{n}"
        growth[n] = _peak_rss_growth(lambda: run_inference(cfg, str(corpus(n)), str(out)))
        pred = json.loads((out / "Subtask_2_pred.json").read_text())
        assert len(pred) == 8 * n
        assert all("notes" not in u for c in pred for u in c["conversation"])  # not an official field
        assert len(read_shards(out)) == 8 * n
    mib = {n: round(g / 2**20, 1) for n, g in growth.items()}
    print(f"driver peak RSS growth: 1x {mib[1]} MiB, 10x {mib[10]} MiB")
    assert growth[10] < growth[1] + 12 * 2**20, mib


def test_share_base_nf4_with_adapters(ray_cluster, tiny, gold40, tmp_path):
    """One 4-bit base holding both (random LoRA) adapters, and a second emotion adapter (inference.emotion_ensemble),
    does both stages; with ``cause_input=gold`` the cause stage reads the gold emotions (oracle analysis), so the
    pairs carry them. The ensemble's adapter is part of the run's identity (test_engine.py checks its average), and
    so are the rule causes, which reach the writer: every emotional utterance is its own cause."""
    from mecpe.infer import run_inference

    src = tmp_path / "in.json"
    src.write_text(json.dumps(gold40[:10]))
    emo = _make_adapter(tiny, tmp_path / "emotion-adapter", 1)
    cau = _make_adapter(tiny, tmp_path / "cause-adapter", 2)
    emo2 = _make_adapter(tiny, tmp_path / "emotion-adapter-2", 3)
    cfg = make_cfg(tiny, share_base=True, emotion_adapter=emo, cause_adapter=cau, cause_input="gold",
                   emotion_ensemble=[emo2], rule_causes=["self"])
    cfg.quantization.mode = "nf4"
    summary = run_inference(cfg, str(src), str(tmp_path / "out"))
    assert summary.conversations == 10 and summary.rejects == 0
    assert summary.provenance["adapters"]["emotion"] == {"uri": emo, "config_hash": "cfg-1"}
    assert summary.provenance["adapters"]["cause"] == {"uri": cau, "config_hash": "cfg-2"}
    assert summary.provenance["adapters"]["emotion_ensemble"] == [{"uri": emo2, "config_hash": "cfg-3"}]
    assert summary.this_run.engine["emotion"]["prompts"] == 2 * sum(len(c["conversation"]) for c in gold40[:10])
    assert summary.this_run.resources.share_base is True
    pred = json.loads((tmp_path / "out" / "Subtask_2_pred.json").read_text())
    assert sorted(c["conversation_ID"] for c in pred) == sorted(c["conversation_ID"] for c in gold40[:10])
    assert all(u["emotion"] in SEVEN for c in pred for u in c["conversation"])
    gold = {(c["conversation_ID"], u["utterance_ID"]): u["emotion"] for c in gold40[:10] for u in c["conversation"]}
    for c in pred:
        for e, _ in c["emotion-cause_pairs"]:
            uid, label = e.split("_")
            assert gold[(c["conversation_ID"], int(uid))] == label
    n_gold_emotional = sum(1 for v in gold.values() if v != "neutral")
    assert sum(summary.parse_status["cause"].values()) == n_gold_emotional
    selves = {(c["conversation_ID"], int(e.split("_")[0])) for c in pred for e, cause in c["emotion-cause_pairs"]
              if e.split("_")[0] == cause}
    assert selves == {k for k, v in gold.items() if v != "neutral"}
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["inference"]["rule_causes"] == ["self"]


def test_s3_input_and_output(ray_cluster, tiny, gold40, s3_server, capsys):
    """``mecpe infer`` from and to S3: the shards, the predictions, and (labelled input) the report written through
    mecpe.storage into the bucket."""
    import boto3

    from mecpe.cli import main

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")
    bucket = s3_server["bucket"]
    convs = gold40[:12]
    s3.put_object(Bucket=bucket, Key="infer-in/part-1.jsonl",
                  Body="".join(json.dumps(c) + "\n" for c in convs[:6]).encode())
    s3.put_object(Bucket=bucket, Key="infer-in/part-2.json", Body=json.dumps(convs[6:]).encode())
    assert main(["infer", "--input", f"s3://{bucket}/infer-in", "--output", f"s3://{bucket}/infer-out",
                 f"model.base={tiny}", "quantization.mode=none", "prompt.max_prompt_tokens=512",
                 "inference.batch_size=8", "inference.num_cpus=0.5"]) == 0
    assert "weighted_f1" in capsys.readouterr().out
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="infer-out/")["Contents"]}
    for name in ("Subtask_2_pred.json", "gold.json", "summary.json", "metrics.json", "report.md",
                 "confusion_matrix.png", "rejects.jsonl", "_run.json"):
        assert f"infer-out/{name}" in keys, keys
    assert any(k.startswith("infer-out/records/part-") for k in keys)
    pred = json.loads(s3.get_object(Bucket=bucket, Key="infer-out/Subtask_2_pred.json")["Body"].read())
    assert sorted(c["conversation_ID"] for c in pred) == sorted(c["conversation_ID"] for c in convs)
    metrics = json.loads(s3.get_object(Bucket=bucket, Key="infer-out/metrics.json")["Body"].read())
    assert 0.0 <= metrics["weighted_f1"] <= 1.0 and metrics["num_conversations_scored"] == 12
    summary = json.loads(s3.get_object(Bucket=bucket, Key="infer-out/summary.json")["Body"].read())
    assert [i["uri"] for i in summary["provenance"]["inputs"]] == [
        f"s3://{bucket}/infer-in/part-1.jsonl", f"s3://{bucket}/infer-in/part-2.json"]


def test_bad_input_mixed_good_and_bad(ray_cluster, tiny, gold40, tmp_path):
    """Bad lines, invalid UTF-8, mistyped conversations, a truncated file and a duplicate id: good conversations
    are predicted, every bad one is a reject with file, location, id and reason; nothing is lost."""
    from mecpe.infer import run_inference

    good = gold40[:6]
    mistyped = dict(gold40[6], conversation=[dict(gold40[6]["conversation"][0], utterance_ID="one")])
    lines = [json.dumps(good[0]).encode(), b'{"conversation_ID": 99, "conversation": [',
             b'{"conversation_ID": 98, "text": "caf\xe9"}', b"", json.dumps(good[1]).encode(),
             json.dumps(mistyped).encode(), json.dumps(good[2]).encode()]
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    no_speaker = {"conversation_ID": 97, "conversation": [{"utterance_ID": 1, "text": "Hi ."}]}
    (src / "b.json").write_text(json.dumps([good[3], no_speaker, good[4], good[0]]))  # good[0] again: duplicate
    (src / "c.json").write_text(json.dumps([good[5]])[:-30])  # truncated: a file-level error
    summary = run_inference(make_cfg(tiny), str(src), str(tmp_path / "out"))

    out = tmp_path / "out"
    pred = json.loads((out / "Subtask_2_pred.json").read_text())
    assert sorted(c["conversation_ID"] for c in pred) == sorted(c["conversation_ID"] for c in good[:5])
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    where = {(Path(r["source"]).name, r["location"]): r for r in rejects}
    file_error = [r for r in rejects if Path(r["source"]).name == "c.json"]
    assert len(file_error) == 1 and "unreadable file" in file_error[0]["reason"]
    assert set(where) - {("c.json", file_error[0]["location"])} == {
        ("a.jsonl", "line 2"), ("a.jsonl", "line 3"), ("a.jsonl", "line 6"), ("b.json", "index 1"),
        ("b.json", "index 3")}
    assert "UTF-8" in where[("a.jsonl", "line 3")]["reason"]
    assert where[("a.jsonl", "line 6")]["conversation_id"] == str(gold40[6]["conversation_ID"])
    assert where[("b.json", "index 1")]["conversation_id"] == "97"
    dup = where[("b.json", "index 3")]
    assert "duplicate" in dup["reason"] and "a.jsonl" in dup["reason"]
    assert all(r["reason"] and r["stage"] for r in rejects)
    # nothing lost: 6 non-blank lines + 4 array items + 1 unreadable file == records + rejects
    assert len(pred) + len(rejects) == 6 + 4 + 1
    assert summary.conversations == 5 and summary.rejects == 6


def test_refuses_output_of_another_run(baseline, tiny, input40, capsys):
    from mecpe.cli import main
    from mecpe.infer import RunMismatchError, run_inference

    out, summary = baseline
    before = json.loads((out / "_run.json").read_text())
    cfg = make_cfg(tiny, emotion_method="generate")
    with pytest.raises(RunMismatchError, match="holds the results of another run") as err:
        run_inference(cfg, str(input40), str(out))
    assert "differs in: inference" in str(err.value)
    rc = main(["infer", "--input", str(input40), "--output", str(out), f"model.base={tiny}", "quantization.mode=none"])
    assert rc == 2 and "holds the results of another run" in capsys.readouterr().err
    assert json.loads((out / "_run.json").read_text()) == before  # untouched


def test_overwrite_replaces_another_run(baseline, tiny, gold40, tmp_path):
    """``--overwrite`` (run_inference(overwrite=True)) is the only way to replace another run's results (here a copy
    of the module's baseline run: other config, other input): the old shards and files are deleted first, so the two
    runs never mix."""
    import shutil

    from mecpe.cli import main
    from mecpe.infer import RunMismatchError, run_inference

    src = tmp_path / "in.json"
    src.write_text(json.dumps(gold40[:3]))
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    first_run_id = json.loads((out / "_run.json").read_text())["run_id"]
    old_shards = {p.name for p in (out / "records").glob("*.jsonl")}
    assert old_shards
    other = make_cfg(tiny, emotion_method="generate")
    with pytest.raises(RunMismatchError):
        run_inference(other, str(src), str(out))
    assert main(["infer", "--input", str(src), "--output", str(out), "--overwrite", f"model.base={tiny}",
                 "quantization.mode=none", "prompt.max_prompt_tokens=512", "inference.batch_size=8",
                 "inference.num_cpus=0.5", "inference.emotion_method=generate"]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["run_id"] != first_run_id and second["conversations"] == 3 and not second["resumed"]
    # labelled input: `mecpe infer` scored it through the one route (pipeline.step_infer(score=True)), report beside it
    assert json.loads((out / "metrics.json").read_text())["weighted_f1"] >= 0.0 and (out / "report.md").exists()
    assert json.loads((out / "_run.json").read_text())["run_id"] == second["run_id"]
    assert len(read_shards(out)) == 3 and not old_shards & {p.name for p in (out / "records").glob("*.jsonl")}


@pytest.mark.heavy
def test_full_test_set_cli(ray_cluster, tiny, data_dir, tmp_path):
    """`mecpe infer` on all 341 official test conversations."""
    from mecpe.cli import main

    out = tmp_path / "out"
    rc = main(["infer", "--input", str(data_dir / TEST_FILE), "--output", str(out), f"model.base={tiny}",
               "quantization.mode=none", "inference.num_cpus=0.5", "inference.batch_size=16"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conversations"] == 341 and summary["utterances"] == 3101 and summary["rejects"] == 0
    assert json.loads((out / "metrics.json").read_text())["num_conversations_scored"] == 341
