"""The N-times ECF corpus for inference at scale, and the check that an inference output accounts for it.

The corpus is the official test set (341 conversations, 3,101 utterances) repeated ``copies`` times, copy k
(1..copies) under conversation ids ``k * 100000 + id``: every id is new, lengths and texts are real. Gold labels are
dropped (a raw corpus, as a user's would be), one conversation per JSON Lines line: ``mecpe infer`` streams JSONL.

The check reads what ``mecpe infer`` writes (``Subtask_2_pred.json`` and ``rejects.jsonl``) and says whether every
input conversation id is in exactly one of them, exactly once.

    python bench/ecf_corpus.py build --copies 100 --out /tmp/corpus-x100.jsonl
    python bench/ecf_corpus.py check --corpus /tmp/corpus-x100.jsonl --output OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Iterator

TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"
ID_STRIDE = 100_000  # official ids are 1375..2039: copy k's ids never collide with another copy's
PRED_FILE = "Subtask_2_pred.json"  # what `mecpe infer` writes into --output (mecpe.layout, read only)
REJECTS_FILE = "rejects.jsonl"
SUMMARY_FILE = "summary.json"


def test_conversations(data_dir: str) -> list[dict]:
    """The official Subtask 2 test conversations, file order."""
    with open(os.path.join(data_dir, TEST_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def corpus_id(copy: int, conversation_id: int) -> int:
    return copy * ID_STRIDE + int(conversation_id)


def original_id(new_id: int) -> tuple[int, int]:
    """(copy, official id) of a corpus conversation id."""
    return divmod(int(new_id), ID_STRIDE)


def unlabelled(conv: dict, new_id: int) -> dict:
    """The conversation as raw input: ids, texts and speakers only."""
    utts = [{k: u[k] for k in ("utterance_ID", "text", "speaker")} for u in conv["conversation"]]
    return {"conversation_ID": new_id, "conversation": utts}


def corpus_records(convs: list[dict], copies: int) -> Iterator[dict]:
    for k in range(1, copies + 1):
        for c in convs:
            yield unlabelled(c, corpus_id(k, c["conversation_ID"]))


def write_corpus(data_dir: str, copies: int, path: str) -> dict:
    """Write the corpus (atomically: a half-written corpus is never reused); returns its counts."""
    convs = test_conversations(data_dir)
    tmp = f"{path}.tmp-{os.getpid()}"
    n = utts = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in corpus_records(convs, copies):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
            utts += len(rec["conversation"])
    os.replace(tmp, path)
    return {"copies": copies, "conversations": n, "utterances": utts, "path": path}


def ensure_corpus(data_dir: str, copies: int, path: str) -> dict:
    """The corpus at ``path``, written unless a complete one (right line count) is there."""
    expected = copies * len(test_conversations(data_dir))
    if os.path.exists(path):
        with open(path, "rb") as fh:
            if sum(1 for _ in fh) == expected:
                return corpus_counts(path) | {"copies": copies, "path": path}
    return write_corpus(data_dir, copies, path)


def corpus_counts(path: str) -> dict:
    n = utts = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            n += 1
            utts += len(json.loads(line)["conversation"])
    return {"conversations": n, "utterances": utts}


def input_ids(path: str) -> list[str]:
    """Conversation ids of an input file (JSONL or a JSON array), as strings (the rejects file's form)."""
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            return [str(json.loads(line)["conversation_ID"]) for line in fh if line.strip()]
        return [str(c["conversation_ID"]) for c in json.load(fh)]


def output_ids(output_dir: str) -> tuple[list[str], list[str], int]:
    """(predicted ids, rejected ids, rejects without an id) of a ``mecpe infer`` output folder."""
    with open(os.path.join(output_dir, PRED_FILE), encoding="utf-8") as fh:
        pred = [str(c["conversation_ID"]) for c in json.load(fh)]
    rejected, anonymous = [], 0
    path = os.path.join(output_dir, REJECTS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    cid = json.loads(line).get("conversation_id")
                    if cid is None:
                        anonymous += 1
                    else:
                        rejected.append(str(cid))
    return pred, rejected, anonymous


def check_output(input_path: str, output_dir: str) -> dict:
    """Every input conversation exactly once in the predictions or the rejects: counts and the first offenders."""
    wanted = Counter(input_ids(input_path))
    pred, rejected, anonymous = output_ids(output_dir)
    seen = Counter(pred) + Counter(rejected)
    missing = [i for i in wanted if i not in seen]
    repeated = [i for i, n in seen.items() if n > 1]
    unknown = [i for i in seen if i not in wanted]
    ok = not (missing or repeated or unknown or anonymous) and all(n == 1 for n in wanted.values())
    return {"ok": ok, "input_conversations": sum(wanted.values()), "duplicate_input_ids": sum(n > 1 for n in
                                                                                               wanted.values()),
            "predicted": len(pred), "rejected": len(rejected), "rejects_without_id": anonymous,
            "missing": len(missing), "more_than_once": len(repeated), "not_in_input": len(unknown),
            "examples": {"missing": missing[:5], "more_than_once": repeated[:5], "not_in_input": unknown[:5]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the N-times corpus (JSONL)")
    b.add_argument("--copies", type=int, required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--data", default=os.environ.get("MECPE_DATA", "../shared/data/ecf"))
    c = sub.add_parser("check", help="every input conversation once in the predictions or the rejects")
    c.add_argument("--corpus", required=True, help="the input file (.jsonl or .json)")
    c.add_argument("--output", required=True, help="the `mecpe infer --output` folder")
    a = ap.parse_args()
    if a.cmd == "build":
        print(json.dumps(write_corpus(a.data, a.copies, a.out)))
        return 0
    res = check_output(a.corpus, a.output)
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
