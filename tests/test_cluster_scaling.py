"""Scale from zero: the autoscaler (v2, as ``ray up`` starts it since Ray 2.50) with Ray's fake multi-node provider
and cluster.yaml's node types (``min_workers: 0``), the pipeline submitted with ``ray job submit`` to its head, as a
user submits it to the cloud cluster. Nodes are read from Ray (``ray.nodes()``, the state API), never assumed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from _cluster import actor_nodes, autoscaler_env, autoscaling_config, node_type_of
from _faults import wait_for
from _ray_head import BIN, RayHead, free_port
from _tiny import REPO, tiny_model_dir

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

IDLE_TIMEOUT_MIN = 0.1  # 6 s, so the test sees nodes go


def _cluster_overrides(tiny: str) -> list[str]:
    """jobs/configs/ecf-llama2-13b.yaml's placement (A100 training workers, T4 inference actors, one per T4 node with
    both adapters) on the tiny model; a CPU per training worker instead of a GPU (tests/_cluster.py says why)."""
    return [f"model.base={tiny}", "scaling.use_gpu=false", "scaling.resources_per_worker={CPU: 1}",
            "scaling.accelerator_type=A100", "inference.num_gpus=1", "inference.accelerator_type=T4",
            "inference.num_cpus=0.25", "inference.share_base=true", "inference.num_actors=2",
            "inference.batch_size=4", "data.limit_test=8"]


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory, data_dir, s3_server):
    """A head with the autoscaler and no worker node; started after the S3 server, so the head and the nodes it
    launches inherit its endpoint and credentials."""
    import ray
    from ray._private.services import get_node_ip_address

    assert not ray.is_initialized(), "another test module left Ray running"
    root = tmp_path_factory.mktemp("autoscaling")
    port = free_port()
    gcs = f"{get_node_ip_address()}:{port}"
    config = root / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs, IDLE_TIMEOUT_MIN)))
    head = RayHead(num_cpus=0, port=port, extra_args=[f"--autoscaling-config={config}"],
                   env=dict(os.environ, **autoscaler_env(), MECPE_DATA=str(Path(data_dir).resolve())))
    try:
        head.wait_for_job_server()
        ray.init(address=gcs)
        yield {"head": head, "gcs": gcs, "root": root}
    finally:
        ray.shutdown()
        head.stop()


def _alive_types() -> list[str]:
    import ray

    return sorted(node_type_of(n["Resources"]) for n in ray.nodes() if n["Alive"])


@pytest.fixture(scope="module")
def s3_root(s3_server) -> str:
    return f"s3://{s3_server['bucket']}/scaling-{time.time_ns()}"


@pytest.fixture(scope="module")
def mirror(s3_root) -> str:
    """The tiny base model in S3: the launched nodes fetch it (a cluster's nodes share no disk with the driver)."""
    from mecpe import storage

    storage.upload_dir(tiny_model_dir(), f"{s3_root}/model")
    return f"{s3_root}/model"


@pytest.mark.reliability(
    fault="Scale from zero: the pipeline submitted (ray job submit) to a cluster that has only its head "
          "(cluster.yaml's node types, min_workers 0, the autoscaler v2)",
    behaviour="The autoscaler launches an A100-type node for training and T4-type nodes for inference; training "
              "workers run only on A100 nodes and the inference actors only on T4 nodes (Ray's state API); outputs, "
              "runs and the base model are in S3 (the job's config has no local path: it would be refused); the "
              "nodes are released after the idle timeout")
def test_scale_from_zero_pipeline_job(autoscaling_head, mirror, s3_root):
    """Also the suite's one run of ``jobs/configs/smoke.yaml``'s whole pipeline (every step, the validation step
    with an emotion bias fitted), so it checks what that run must write: ``_check_smoke_outputs``."""
    import ray

    from mecpe import storage

    assert _alive_types() == ["head"]
    out = f"{s3_root}/out"
    # The job runs from the repository on this disk (as from an image with mecpe in it), not from an uploaded
    # working_dir (tests/test_jobs.py covers that): the fake provider's nodes share this machine's Ray session
    # folder, and a node starting up clears the runtime-env files that are the job workers' working directory.
    cmd = [str(BIN / "ray"), "job", "submit", "--address", autoscaling_head["head"].address, "--",
           sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", str(REPO / "jobs" / "configs" / "smoke.yaml"),
           f"output_dir={out}", f"storage.path={out}/runs", *_cluster_overrides(mirror), "validation.fit_emotion_bias=true"]
    seen: list[list[str]] = []
    types: dict[str, str] = {}  # node id -> type, read while the node is alive (a dead node reports no resources)
    done = threading.Event()

    def watch():
        while not done.is_set():
            alive = [n for n in ray.nodes() if n["Alive"]]
            types.update({n["NodeID"]: node_type_of(n["Resources"]) for n in alive})
            seen.append(sorted(node_type_of(n["Resources"]) for n in alive))
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=autoscaling_head["head"].env, capture_output=True, text=True,
                              timeout=900)
    finally:
        done.set()
        watcher.join()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log.lower(), log[-5000:]
    assert any("a100" in s for s in seen) and any("t4" in s for s in seen), seen  # launched on demand
    workers = set().union(*actor_nodes("RayTrainWorker").values())
    predictors = set().union(*actor_nodes("EmotionCausePredictor").values())
    assert workers and {types[n] for n in workers} == {"a100"}, workers
    assert predictors and {types[n] for n in predictors} == {"t4"}, predictors
    _check_smoke_outputs(out, log, limit_test=8)
    # released after the idle timeout
    wait_for(lambda: _alive_types() == ["head"], 120, "the worker nodes to be released")


def _check_smoke_outputs(out: str, log: str, limit_test: int) -> None:
    """What a run of the smoke config writes (local or S3 alike): every step, ``data.limit_test`` honoured (inference
    and scoring on the first N test conversations, and the report says so); the validation step scored on the first 8
    validation conversations with an emotion bias fitted there (applied or not by its 2-fold estimate), beside the
    test figures; the sanity gate's warning exactly when one class takes over 90% of the uncalibrated predictions;
    the report, its figures and the adapters' learning curves."""
    from matplotlib.image import imread

    from mecpe import storage

    def read(rel: str) -> bytes:
        return storage.read_bytes(f"{out}/{rel}")

    assert "weighted_f1" in log and "cause stage:" in log and f"first {limit_test} of the 341" in log
    assert "validation split (8 conversations" in log
    val = storage.read_json(f"{out}/validation/metrics.json")
    cal = storage.read_json(f"{out}/validation/calibration.json")
    assert val["conversations"] == 8
    assert cal["utterances"] == sum(len(c["conversation"]) for c in storage.read_json(f"{out}/data/val-first-8.json"))
    assert storage.exists(f"{out}/validation/inference") == cal["applied"]
    raw = storage.read_json(f"{out}/validation/raw/metrics.json")
    predicted = [sum(col) for col in zip(*raw["emotion_confusion"])]
    assert ("WARNING: validation split: " in log) == (max(predicted) / sum(predicted) > 0.9), predicted
    assert storage.read_json(f"{out}/pipeline.json")["emotion_bias"] == (cal["bias"] if cal["applied"] else None)
    report = read("report.md").decode()
    assert "## Validation split" in report and f"first {limit_test} of the 341 test conversations" in report
    pred = storage.read_json(f"{out}/Subtask_2_pred.json")
    test_ids = [c["conversation_ID"] for c in storage.read_json(f"{out}/data/test.json")]
    assert len(test_ids) == 341 and [c["conversation_ID"] for c in pred] == sorted(test_ids[:limit_test])
    metrics = storage.read_json(f"{out}/metrics.json")
    assert metrics["num_conversations_scored"] == limit_test and f"data.limit_test={limit_test}" in metrics["notes"][0]
    assert storage.read_json(f"{out}/inference/summary.json")["conversations"] == limit_test
    for key in ("precision_pair", "recall_pair", "f1_pair", "weighted_precision", "weighted_recall", "weighted_f1"):
        assert isinstance(metrics[key], float)
    assert all(emo in report for emo in ("anger", "disgust", "fear", "joy", "sadness", "surprise"))
    assert "baseline" in report.lower() and len(metrics["emotion_confusion"]) == 7
    png = read("confusion_matrix.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(io.BytesIO(png), format="png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    # the adapters' runs and their learning curves are in the report
    assert set(metrics["adapters"]) == {"emotion", "cause"}
    assert all(a["run_name"].startswith(t + "-") for t, a in metrics["adapters"].items())
    assert read("learning_curves.png")[:4] == b"\x89PNG"


@pytest.mark.reliability(
    fault="A config whose accelerator_type no node type of the cluster offers (H100 on a cluster of A100 and T4 "
          "nodes), for training and for inference",
    behaviour="The step asks the autoscaler before it waits; it fails within seconds with exit code 2 and a "
              "message naming the resource (accelerator_type:H100), instead of waiting forever")
def test_unschedulable_accelerator_fails_fast(autoscaling_head, mirror, s3_root, data_dir, capsys):
    from mecpe import storage
    from mecpe.cli import main

    gold = json.loads((data_dir / "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json").read_text())[:2]
    src = f"{s3_root}/unschedulable/in.json"
    storage.write_json(src, gold)
    base = [*_cluster_overrides(mirror), f"ray_address={autoscaling_head['gcs']}"]
    t0 = time.monotonic()
    assert main(["infer", "--input", src, "--output", f"{s3_root}/unschedulable/out", *base,
                 "inference.accelerator_type=H100"]) == 2
    err = capsys.readouterr().err
    assert "accelerator_type:H100" in err and "inference" in err, err
    assert not storage.exists(f"{s3_root}/unschedulable/out/_run.json")  # refused before claiming the output
    out = f"{s3_root}/unschedulable/train"
    storage.write_json(f"{out}/data/train.json", gold)
    storage.write_json(f"{out}/data/val.json", gold[:1])
    assert main(["train", "--task", "emotion", f"output_dir={out}", f"storage.path={out}/runs", *base,
                 "scaling.accelerator_type=H100"]) == 2
    err = capsys.readouterr().err
    assert "accelerator_type:H100" in err and "training" in err, err
    assert time.monotonic() - t0 < 120


@pytest.mark.reliability(
    fault="Another writer replaces the step's request to the autoscaler before the autoscaler reads it (Ray Data's "
          "detached AutoscalingCoordinator, left by any earlier Ray Data job, rewrites the cluster's one resource "
          "constraint every 20 s)",
    behaviour="The check sees its request gone, asks again, and still fails the step on the infeasible accelerator "
              "instead of taking the autoscaler's verdict on the other request as its own")
def test_unschedulable_check_survives_a_replaced_request(autoscaling_head):
    from ray.autoscaler.v2.sdk import request_cluster_resources

    from mecpe import cluster
    from mecpe.errors import UnschedulableError

    need = {"CPU": 0.25, "GPU": 1.0, "accelerator_type:H100": 0.001}
    replaced = threading.Event()

    def replace_once():  # as the coordinator's tick would, the moment the check's request is stored
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = cluster._status()
            if st is not None and cluster._ours(st.cluster_resource_state.cluster_resource_constraints, need):
                request_cluster_resources(autoscaling_head["gcs"], [])
                replaced.set()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=replace_once, daemon=True)
    thread.start()
    with pytest.raises(UnschedulableError, match="accelerator_type:H100"):
        cluster.check_schedulable(need, "inference", count=2, timeout_s=60)
    thread.join()
    assert replaced.is_set()
