"""The cluster, for real: placement by GPU type, spot preemption of whole nodes, and scale from zero, on several Ray
nodes of this machine with the node types of cluster.yaml (tests/_cluster.py says how they are made).

* ``StaticCluster`` (``ray.cluster_utils.Cluster``): a CPU head, an A100-type node and two T4-type nodes, each node
  with its own raylet, object store and HOME (model cache). Training and inference run on it as on the cloud; nodes
  are preempted the way a spot termination notice does it (Ray's drain with the preemption reason and a deadline),
  then removed with everything on them, and replaced by fresh nodes, as the autoscaler would.
* The autoscaler v2 with Ray's fake multi-node provider (``test_scale_from_zero_*``): the node types of cluster.yaml
  with ``min_workers: 0``; the pipeline submitted with ``ray job submit`` to its head.

Assertions about where things ran come from Ray's state API (node ids of the actors), never from config values."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mecpe import storage
from mecpe.config import load_config
from mecpe.train import checkpoints

from _cluster import StaticCluster, actor_nodes, drain, node_type_of
from _faults import wait_for
from _tiny import REPO, tiny_model_dir, train_records

TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"
N_CONVS = 16
MAX_STEPS, SAVE_STEPS = 16, 4


def _training(tiny_base: str, out: Path, runs: str, cache: str, **extra) -> list[str]:
    """The cluster recipe's placement (jobs/configs/ecf-llama2-13b.yaml: accelerator_type A100) with the tiny model;
    a CPU per worker instead of a GPU (tests/_cluster.py says why)."""
    values = {"output_dir": str(out), "model.base": tiny_base, "model.cache_dir": cache, "quantization.mode": "nf4",
              "prompt.max_prompt_tokens": 512, "data.limit_val": 2, "training.max_steps": MAX_STEPS,
              "training.per_device_batch_size": 2, "training.grad_accum": 1, "training.learning_rate": 3e-3,
              "training.warmup_ratio": 0.0, "training.optim": "adamw_torch", "training.save_steps": SAVE_STEPS,
              "training.logging_steps": 1, "scaling.num_workers": 1, "scaling.use_gpu": "false",
              "scaling.resources_per_worker": "{CPU: 1}", "scaling.accelerator_type": "A100",
              "scaling.max_failures": 0,  # anything but a preemption ends the run: a preemption must count as one
              "storage.path": runs, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _inference(tiny_base: str, **extra) -> list[str]:
    """The cluster recipe's inference placement: one GPU and accelerator_type T4 per actor, both adapters on one base
    (inference.share_base), an actor per T4 node."""
    values = {"model.base": tiny_base, "quantization.mode": "none", "prompt.max_prompt_tokens": 512,
              "inference.batch_size": 2, "inference.num_actors": 2, "inference.num_gpus": 1,
              "inference.num_cpus": 0.25, "inference.accelerator_type": "T4", "inference.share_base": "true", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _node_types() -> dict[str, str]:
    import ray

    return {n["NodeID"]: node_type_of(n["Resources"]) for n in ray.nodes()}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "records").glob("*.jsonl")) for line in f.read_text().splitlines()]


def _predictions(out: Path) -> dict:
    pred = json.loads((out / "Subtask_2_pred.json").read_text())
    return {c["conversation_ID"]: ([u["emotion"] for u in c["conversation"]], sorted(map(tuple, c["emotion-cause_pairs"])))
            for c in pred}


def _alive_actor_nodes(class_substring: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True,
                                           raise_on_missing_output=False)
            if class_substring in (a.class_name or "")}


def _complete_stored_step(run_dir: str, probe: Path) -> int:
    """Step of the newest checkpoint stored under the run that is complete (downloaded and verified against its
    manifest, as a resuming worker checks it), 0 when none is."""
    for step, uri in checkpoints.stored_checkpoints(run_dir):
        local = probe / str(step)
        shutil.rmtree(local, ignore_errors=True)
        try:
            storage.download_dir(uri, str(local))
        except (FileNotFoundError, OSError):
            continue
        if checkpoints.verify_checkpoint(str(local)) is None:
            return step
    return 0


def _losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["log_history"] if "loss" in h]


# ============================================================================================ static cluster


@pytest.fixture(scope="module")
def static_cluster(tmp_path_factory, s3_server):
    """Head + one A100-type node + two T4-type nodes; the test process is its driver. Started after the S3 server,
    so every node's processes inherit the S3 endpoint and credentials."""
    import ray

    assert not ray.is_initialized(), "another test module left Ray running"
    c = StaticCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.add("a100")
        c.add("t4")
        c.add("t4")
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def mirror(static_cluster, s3_server) -> str:
    """The tiny base model staged in S3, as the cluster recipe stages Llama-2 (README: "Staging the base weights"):
    each node fetches it once into its own cache."""
    uri = f"s3://{s3_server['bucket']}/models/tiny-{time.time_ns()}"
    storage.upload_dir(tiny_model_dir(), uri)
    return uri


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir) -> Path:
    gold = json.loads((data_dir / TEST_FILE).read_text(encoding="utf-8"))[:N_CONVS]
    path = tmp_path_factory.mktemp("in") / "test.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in gold))
    return path


@pytest.fixture(scope="module")
def uninterrupted_training(static_cluster, mirror, s3_server, tmp_path_factory):
    """A training run on the cluster without faults: where its worker ran, and the per-step losses every
    preempted run must reproduce."""
    from mecpe.pipeline import step_train

    root = tmp_path_factory.mktemp("train-ref")
    out = root / "out"
    (out / "data").mkdir(parents=True)
    recs = train_records()
    (out / "data" / "train.json").write_text(json.dumps(list(recs[:16])))
    (out / "data" / "val.json").write_text(json.dumps(list(recs[200:202])))
    runs = f"s3://{s3_server['bucket']}/cluster-{time.time_ns()}/runs"
    overrides = _training(mirror, out, runs, "~/.cache/mecpe-models")
    res = step_train(load_config(None, overrides), "emotion")
    return {"res": res, "out": out, "overrides": overrides, "workers": actor_nodes("RayTrainWorker")}


@pytest.mark.reliability(
    fault="Placement on a multi-node cluster built from cluster.yaml's node types (CPU head, A100 node, T4 nodes)",
    behaviour="Training workers run only on the A100-type node and the inference actors of both stages only on "
              "T4-type nodes, one per T4 node (node ids of the actors from Ray's state API); the head offers no CPU "
              "(cluster.yaml), so no task can be placed there")
def test_placement_by_gpu_type(static_cluster, uninterrupted_training, inputs, tmp_path):
    from mecpe.infer import run_inference

    types = _node_types()
    workers = set().union(*uninterrupted_training["workers"].values())
    assert workers and {types[n] for n in workers} == {"a100"}, workers
    out = tmp_path / "out"
    summary = run_inference(load_config(None, _inference(tiny_model_dir())), str(inputs), str(out))
    assert summary["conversations"] == N_CONVS and summary["rejects"] == 0
    actors = actor_nodes("EmotionCausePredictor")
    nodes = set().union(*actors.values())
    assert actors and {types[n] for n in nodes} == {"t4"}, actors
    assert len(nodes) == 2  # one actor per T4 node: each asks for that node's one GPU
    ours = set().union(*actor_nodes("RayTrainWorker").values(), *actor_nodes("MapWorker").values())
    assert static_cluster.head_id not in ours


@pytest.mark.reliability(
    fault="A config whose accelerator_type no node offers (H100) on a cluster without an autoscaler (nodes started "
          "by hand: ray start)",
    behaviour="The step compares what it asks for with the nodes there are (all there will be); it fails within "
              "seconds with exit code 2 and a message naming accelerator_type:H100, before claiming the output")
def test_unschedulable_on_fixed_cluster_fails_fast(static_cluster, inputs, tmp_path, capsys):
    from mecpe.cli import main

    t0 = time.monotonic()
    assert main(["infer", "--input", str(inputs), "--output", str(tmp_path / "out"),
                 *_inference(tiny_model_dir(), **{"inference.accelerator_type": "H100"}),
                 f"ray_address={static_cluster.address}"]) == 2
    err = capsys.readouterr().err
    assert "accelerator_type:H100" in err and "no autoscaler" in err, err
    assert not (tmp_path / "out" / "_run.json").exists()
    assert time.monotonic() - t0 < 60


@pytest.fixture(scope="module")
def baseline(static_cluster, inputs, tmp_path_factory) -> Path:
    """An uninterrupted inference run on the cluster: the reference for the preempted ones."""
    from mecpe.infer import run_inference

    out = tmp_path_factory.mktemp("baseline") / "out"
    summary = run_inference(load_config(None, _inference(tiny_model_dir())), str(inputs), str(out))
    assert summary["conversations"] == N_CONVS
    return out


def _check_exactly_once(out: Path, inputs: Path, baseline: Path) -> None:
    want = sorted(json.loads(line)["conversation_ID"] for line in inputs.read_text().splitlines())
    pred = json.loads((out / "Subtask_2_pred.json").read_text())
    ids = [c["conversation_ID"] for c in pred]
    assert sorted(ids) == want and len(ids) == len(set(ids))
    assert (out / "rejects.jsonl").read_text() == ""
    assert _predictions(out) == _predictions(baseline)


@pytest.mark.reliability(
    fault="Spot preemption of a T4 node mid-inference: drained with the preemption reason and a deadline, then "
          "gone with its processes, object store and disk; a fresh T4 node joins",
    behaviour="The preempted node held a predictor actor and the run was part-way; the run still finishes: the "
              "output holds exactly the input conversation ids, none twice, predictions equal to an uninterrupted "
              "run's")
def test_t4_preemption_mid_inference(static_cluster, inputs, baseline, tmp_path):
    from mecpe.infer import run_inference

    out = tmp_path / "out"
    box: dict = {}

    def job():
        try:
            box["summary"] = run_inference(load_config(None, _inference(tiny_model_dir())), str(inputs), str(out))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["err"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    wait_for(lambda: (out / "records").exists() and any((out / "records").glob("*.jsonl")), 300,
             "the first shard", interval=0.1, alive=thread.is_alive)
    types = _node_types()
    busy = [n for n in set().union(*actor_nodes("EmotionCausePredictor").values())
            if types.get(n) == "t4" and n in static_cluster.nodes]
    assert busy, "no live T4 node holds a predictor actor"
    done_before = len(_records(out))
    static_cluster.preempt(busy[0], deadline_s=2.0)
    static_cluster.add("t4")
    thread.join(600)
    assert not thread.is_alive()
    if "err" in box:
        raise box["err"]
    assert done_before < N_CONVS, "the run had finished before the preemption"
    assert box["summary"]["conversations"] == N_CONVS
    _check_exactly_once(out, inputs, baseline)


@pytest.mark.reliability(
    fault="The cluster loses all its T4 nodes mid-inference (spot capacity gone); the driver is killed; the job is "
          "resubmitted once T4 nodes are back",
    behaviour="The resubmitted job recognises its output, keeps every shard already written (not rewritten) and "
              "predicts only the rest: each input conversation exactly once, predictions equal to an uninterrupted "
              "run's")
def test_all_t4_nodes_lost_then_resubmit(static_cluster, inputs, baseline, tmp_path):
    out = tmp_path / "out"
    args = ["infer", "--input", str(inputs), "--output", str(out), *_inference(tiny_model_dir()),
            f"ray_address={static_cluster.address}"]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mecpe.cli", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (out / "records").exists() and len(list((out / "records").glob("*.jsonl"))) >= 2, 300,
                 "two shards", interval=0.1, alive=lambda: proc.poll() is None)
        for node_id in static_cluster.of_type("t4"):
            static_cluster.preempt(node_id, deadline_s=1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    written = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "records").glob("*.jsonl")}
    done = {r["_mecpe"]["uid"] for r in _records(out)}
    assert 0 < len(done) < N_CONVS and not (out / "Subtask_2_pred.json").exists()
    static_cluster.add("t4")
    static_cluster.add("t4")
    from mecpe.cli import main

    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["done_before_this_run"] == len(done)
    assert summary["this_run"]["records"] == N_CONVS - len(done)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "records").glob("*.jsonl")}
    assert {k: after[k] for k in written} == written  # written shards kept as they were, not redone
    _check_exactly_once(out, inputs, baseline)


@pytest.mark.reliability(
    fault="Spot preemption of the A100 node mid-training: drained with the preemption reason and a deadline, then "
          "gone with its processes, disk and model cache; a fresh A100 node joins",
    behaviour="The worker checkpoints at the drain notice (ray.train.get_preemption_info); Ray Train counts a "
              "preemption, not a failure (the run has max_failures=0), and restarts on the new node, which fetches "
              "the base model from the S3 mirror into its own cache; the run resumes from the last checkpoint in "
              "S3 and every step's loss equals an uninterrupted run's")
def test_a100_preemption_mid_training(static_cluster, uninterrupted_training, s3_server, tmp_path):
    from mecpe.pipeline import step_train
    from mecpe.train.driver import run_identity

    ref = uninterrupted_training
    out = ref["out"]
    runs = f"s3://{s3_server['bucket']}/cluster-preempt-{time.time_ns()}/runs"
    # no periodic checkpoint before the end: the one the run resumes from can only be the one taken at the notice
    cfg = load_config(None, [*ref["overrides"], f"storage.path={runs}", f"training.save_steps={MAX_STEPS}"])
    run_dir = storage.join(runs, run_identity(cfg, "emotion", str(out / "data" / "train.json"),
                                              str(out / "data" / "val.json"))[0])
    (old,) = static_cluster.of_type("a100")
    box: dict = {}

    def fit():
        try:
            box["res"] = step_train(cfg, "emotion")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["err"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    wait_for(lambda: old in _alive_actor_nodes("RayTrainWorker"), 300, "the training worker on the A100 node",
             interval=0.1, alive=thread.is_alive)
    drain(static_cluster.address, old, deadline_s=60.0)  # the spot termination notice
    # The node goes as soon as the checkpoint taken at the notice is complete in S3, while the worker trains on
    # (as Ray recommends): Ray Train may not have registered it yet; mecpe resumes from it all the same.
    jit = wait_for(lambda: _complete_stored_step(run_dir, tmp_path / "probe"), 120,
                   "the checkpoint taken at the preemption notice", interval=0.1, alive=thread.is_alive)
    static_cluster.remove(old)
    assert jit < MAX_STEPS
    new = static_cluster.add("a100")
    thread.join(600)
    assert not thread.is_alive()
    if "err" in box:
        raise box["err"]
    res = box["res"]
    m = res.metrics
    assert m["resumed_from_step"] == jit and m["global_step"] == MAX_STEPS
    assert _losses(m) == pytest.approx(_losses(ref["res"].metrics), rel=1e-4)
    # where each attempt ran (state API), and the new node's own model cache filled from the S3 mirror
    workers = actor_nodes("RayTrainWorker")
    assert new in set().union(*workers.values())
    cache = static_cluster.homes[new] / ".cache" / "mecpe-models"
    assert any((d / ".mecpe_complete").exists() and (d / "model.safetensors").exists() for d in cache.iterdir())
