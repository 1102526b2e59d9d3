"""The cluster, for real: placement by GPU type, spot preemption of whole nodes, and scale from zero, on several Ray
nodes of this machine with the node types of cluster.yaml (tests/_cluster.py says how they are made).

* ``StaticCluster`` (``ray.cluster_utils.Cluster``): a CPU head, an A100-type node and two T4-type nodes, each node
  with its own raylet, object store, HOME (model cache) and scratch folder. Training and inference run on it as on
  the cloud: inputs, outputs, runs and the base model in S3 (the moto server), nothing on a disk two nodes share;
  every test ends by checking that no node's process opened a file in the driver's folders. Nodes are preempted the
  way a spot termination notice does it (Ray's drain with the preemption reason and a deadline), then removed with
  everything on them, and replaced by fresh nodes, as the autoscaler would.
* The autoscaler v2 with Ray's fake multi-node provider (``test_scale_from_zero_*``): the node types of cluster.yaml
  with ``min_workers: 0``; the pipeline submitted with ``ray job submit`` to its head.

Assertions about where things ran come from Ray's state API (node ids of the actors), never from config values."""

from __future__ import annotations

import hashlib
import json
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
from _faults import own_lines, state_address, wait_for, wait_job_gone
from _tiny import REPO, tiny_model_dir, train_records

pytestmark = pytest.mark.slow  # Ray, training or subprocess pipelines: outside the quick tier (README)

TEST_FILE = "NUSTM_SemEval-2024_ECAC/data/Subtask_2_test.json"
N_CONVS = 16
MAX_STEPS, SAVE_STEPS = 16, 4


def _training(tiny_base: str, out: str, runs: str, cache: str, **extra) -> list[str]:
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


def _shards(out: str) -> list[str]:
    records = storage.join(out, "records")
    return storage.list_files(records, suffixes=(".jsonl",)) if storage.exists(records) else []


def _records(out: str) -> list[dict]:
    return [json.loads(line) for f in _shards(out) for line in storage.read_bytes(f).decode().splitlines()]


def _predictions(out: str) -> dict:
    pred = storage.read_json(storage.join(out, "Subtask_2_pred.json"))
    return {c["conversation_ID"]: ([u["emotion"] for u in c["conversation"]], sorted(map(tuple, c["emotion-cause_pairs"])))
            for c in pred}


def _alive_actor_nodes(class_substring: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(address=state_address(), filters=[("state", "=", "ALIVE")], detail=True,
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
def driver_dir(tmp_path_factory) -> Path:
    """The driver's own folder: on the cloud, on the driver's machine only."""
    return tmp_path_factory.mktemp("driver")


@pytest.fixture(scope="module")
def static_cluster(tmp_path_factory, s3_server, driver_dir, data_dir):
    """Head + one A100-type node + two T4-type nodes; the test process is its driver. Started after the S3 server,
    so every node's processes inherit the S3 endpoint and credentials. The driver's folders (its own, the tiny
    model's build folder, the ECF data) are traced on every node."""
    import ray

    assert not ray.is_initialized(), "another test module left Ray running"
    with pytest.MonkeyPatch.context() as mp:
        # Ray Train's preemption watcher, off on the suite's one-node Rays (tests/conftest.py), is on here: these
        # tests drain nodes. Ray Train reads the setting in the driver (this process) and passes it to its actors.
        mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
        c = StaticCluster(tmp_path_factory.mktemp("cluster"),
                          driver_only=(driver_dir, Path(tiny_model_dir()).parent, Path(data_dir)))
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
    """The tiny base model staged in S3, as the cluster recipe stages Llama-2 (docs/cluster.md: "Staging the base weights"):
    each node fetches it once into its own cache."""
    uri = f"s3://{s3_server['bucket']}/models/tiny-{time.time_ns()}"
    storage.upload_dir(tiny_model_dir(), uri)
    return uri


@pytest.fixture(autouse=True)
def no_worker_reads_the_drivers_disk(request):
    """After each test: no process of a node opened a file in the driver's folders (tests/_cluster.py)."""
    yield
    if "static_cluster" in request.fixturenames:
        assert request.getfixturevalue("static_cluster").driver_reads() == []


@pytest.fixture(scope="module")
def s3_root(s3_server) -> str:
    return f"s3://{s3_server['bucket']}/cluster-{time.time_ns()}"


@pytest.fixture(scope="module")
def inputs(s3_root, data_dir) -> str:
    gold = json.loads((data_dir / TEST_FILE).read_text(encoding="utf-8"))[:N_CONVS]
    uri = f"{s3_root}/in/test.jsonl"
    storage.write_bytes(uri, "".join(json.dumps(c) + "\n" for c in gold).encode())
    return uri


def _out(s3_root: str, name: str) -> str:
    return f"{s3_root}/{name}-{time.time_ns()}"


@pytest.fixture(scope="module")
def uninterrupted_training(static_cluster, mirror, s3_root):
    """A training run on the cluster without faults: where its worker ran, and the per-step losses every
    preempted run must reproduce."""
    from mecpe.pipeline import step_train

    out = _out(s3_root, "train-ref")
    recs = train_records()
    storage.write_json(f"{out}/data/train.json", list(recs[:16]))
    storage.write_json(f"{out}/data/val.json", list(recs[200:202]))
    runs = f"{out}/runs"
    overrides = _training(mirror, out, runs, "~/.cache/mecpe-models")
    res = step_train(load_config(None, overrides), "emotion")
    return {"res": res, "out": out, "overrides": overrides, "workers": actor_nodes("RayTrainWorker")}


@pytest.mark.reliability(
    fault="Placement on a multi-node cluster built from cluster.yaml's node types (CPU head, A100 node, T4 nodes)",
    behaviour="Training workers run only on the A100-type node and the inference actors of both stages only on "
              "T4-type nodes, one per T4 node (node ids of the actors from Ray's state API); the head offers no CPU "
              "(cluster.yaml), so no task can be placed there. Inputs, outputs, runs and the base model are in S3, "
              "each node has its own HOME and scratch folder, and after every test of the file no node's process "
              "had opened a file in the driver's folders (an open tracer preloaded on each node)")
def test_placement_by_gpu_type(static_cluster, uninterrupted_training, baseline):
    """The inference placed is the module's baseline run (the first inference on this cluster): the preemption tests
    compare with it, so it runs once for both."""
    types = _node_types()
    workers = set().union(*uninterrupted_training["workers"].values())
    assert workers and {types[n] for n in workers} == {"a100"}, workers
    summary = storage.read_json(storage.join(baseline, "summary.json"))
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
def test_unschedulable_on_fixed_cluster_fails_fast(static_cluster, mirror, inputs, s3_root, capsys):
    from mecpe.cli import main

    t0 = time.monotonic()
    out = _out(s3_root, "h100")
    assert main(["infer", "--input", inputs, "--output", out,
                 *_inference(mirror, **{"inference.accelerator_type": "H100"}),
                 f"ray_address={static_cluster.address}"]) == 2
    err = capsys.readouterr().err
    assert "accelerator_type:H100" in err and "no autoscaler" in err, err
    assert not storage.exists(f"{out}/_run.json")
    assert time.monotonic() - t0 < 60


@pytest.mark.reliability(
    fault="A step on a multi-node cluster given local paths (the driver's disk) for its output, input, runs or "
          "model, as a config written for one machine (local.yaml) would",
    behaviour="Refused before it starts, exit code 2, one line naming each key (--output, output_dir, storage.path, "
              "model.base, --input) and the fix (an s3:// URI, or storage.shared_filesystem=true for a file system "
              "every node mounts); nothing is written. With storage.shared_filesystem=true the check is skipped")
def test_local_paths_refused_on_a_multi_node_cluster(static_cluster, mirror, inputs, driver_dir, s3_root, capsys):
    from mecpe.cli import main

    cluster = [f"ray_address={static_cluster.address}"]
    local_out = driver_dir / "out"
    assert main(["infer", "--input", inputs, "--output", str(local_out), *_inference(mirror), *cluster]) == 2
    err = capsys.readouterr().err.strip()
    assert len(own_lines(err)) == 1 and f"--output={local_out}" in err, err
    assert " nodes" in err and "s3://" in err and "storage.shared_filesystem=true" in err, err
    assert not local_out.exists()
    local_in = driver_dir / "in.jsonl"
    local_in.write_bytes(storage.read_bytes(inputs))
    assert main(["infer", "--input", str(local_in), "--output", _out(s3_root, "refused"),
                 *_inference(str(Path(tiny_model_dir()))), *cluster]) == 2
    err = capsys.readouterr().err
    assert f"--input={local_in}" in err and f"model.base={tiny_model_dir()}" in err, err
    for split in ("train", "val"):
        storage.write_json(str(driver_dir / "train" / "data" / f"{split}.json"), list(train_records()[:2]))
    assert main(["train", "--task", "emotion", f"output_dir={driver_dir / 'train'}",
                 f"storage.path={driver_dir / 'runs'}", f"model.base={mirror}", *cluster]) == 2
    err = capsys.readouterr().err
    assert f"storage.path={driver_dir / 'runs'}" in err and f"output_dir={driver_dir / 'train'}" in err, err
    assert not (driver_dir / "runs").exists()
    # declared shared: the check is skipped; the step goes on to its next check (here: a GPU type no node offers)
    assert main(["infer", "--input", inputs, "--output", str(local_out), "storage.shared_filesystem=true",
                 *_inference(mirror, **{"inference.accelerator_type": "H100"}), *cluster]) == 2
    assert "accelerator_type:H100" in capsys.readouterr().err


def test_driver_reads_are_detected(static_cluster, driver_dir):
    """The check that ends every test here can fail: a task on a T4 node that opens a driver-only file, through
    pyarrow (as mecpe.storage reads) and through Python's open, is recorded with the path."""
    import ray

    private = driver_dir / "private.json"
    private.write_text("{}")
    (t4,) = static_cluster.of_type("t4")[:1]

    @ray.remote(num_cpus=0.25, resources={"accelerator_type:T4": 0.01})
    def read(path: str) -> tuple[bytes, str]:
        with open(path) as fh:
            text = fh.read()
        return storage.read_bytes(path), text

    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(t4, soft=False)
    assert ray.get(read.options(scheduling_strategy=strategy).remote(str(private))) == (b"{}", "{}")
    reads = static_cluster.driver_reads()
    assert len([r for r in reads if r.endswith(str(private))]) >= 2, reads
    for log in static_cluster.root.glob("opens-*.log"):
        log.unlink()  # seen; the autouse check after this test starts from none


@pytest.fixture(scope="module")
def baseline(static_cluster, mirror, inputs, s3_root) -> str:
    """An uninterrupted inference run on the cluster: the reference for the preempted ones."""
    from mecpe.infer import run_inference

    out = _out(s3_root, "baseline")
    summary = run_inference(load_config(None, _inference(mirror)), inputs, out)
    assert summary.conversations == N_CONVS
    return out


def _check_exactly_once(out: str, inputs: str, baseline: str) -> None:
    want = sorted(json.loads(line)["conversation_ID"] for line in storage.read_bytes(inputs).decode().splitlines())
    pred = storage.read_json(storage.join(out, "Subtask_2_pred.json"))
    ids = [c["conversation_ID"] for c in pred]
    assert sorted(ids) == want and len(ids) == len(set(ids))
    assert storage.read_bytes(storage.join(out, "rejects.jsonl")) == b""
    assert _predictions(out) == _predictions(baseline)


@pytest.mark.reliability(
    fault="Spot preemption of a T4 node mid-inference: drained with the preemption reason and a deadline, then "
          "gone with its processes, object store and disk; a fresh T4 node joins",
    behaviour="The preempted node held a predictor actor and the run was part-way; the run still finishes: the "
              "output holds exactly the input conversation ids, none twice, predictions equal to an uninterrupted "
              "run's")
def test_t4_preemption_mid_inference(static_cluster, mirror, inputs, baseline, s3_root):
    from mecpe.infer import run_inference

    out = _out(s3_root, "t4-preempt")
    box: dict = {}

    def job():
        try:
            box["summary"] = run_inference(load_config(None, _inference(mirror)), inputs, out)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["err"] = exc

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    wait_for(lambda: _shards(out), 300, "the first shard", interval=0.1, alive=thread.is_alive)
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
    assert box["summary"].conversations == N_CONVS
    _check_exactly_once(out, inputs, baseline)


@pytest.mark.reliability(
    fault="The cluster loses all its T4 nodes mid-inference (spot capacity gone); the driver is killed; the job is "
          "resubmitted once T4 nodes are back",
    behaviour="The resubmitted job recognises its output, keeps every shard already written (not rewritten) and "
              "predicts only the rest: each input conversation exactly once, predictions equal to an uninterrupted "
              "run's")
def test_all_t4_nodes_lost_then_resubmit(static_cluster, mirror, inputs, baseline, s3_root, tmp_path):
    out = _out(s3_root, "t4-lost")
    args = ["infer", "--input", inputs, "--output", out, *_inference(mirror), f"ray_address={static_cluster.address}"]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mecpe.cli", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(_shards(out)) >= 2, 300, "two shards", interval=0.1, alive=lambda: proc.poll() is None)
        for node_id in static_cluster.of_type("t4"):
            static_cluster.preempt(node_id, deadline_s=1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        wait_job_gone(proc.pid)  # a shard the killed job's writer had in flight lands now or never
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    written = {f: hashlib.sha256(storage.read_bytes(f)).hexdigest() for f in _shards(out)}
    done = {r["_mecpe"]["uid"] for r in _records(out)}
    assert 0 < len(done) < N_CONVS and not storage.exists(storage.join(out, "Subtask_2_pred.json"))
    static_cluster.add("t4")
    static_cluster.add("t4")
    from mecpe.cli import main

    assert main(args) == 0
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert summary["resumed"] and summary["done_before_this_run"] == len(done)
    assert summary["this_run"]["records"] == N_CONVS - len(done)
    after = {f: hashlib.sha256(storage.read_bytes(f)).hexdigest() for f in _shards(out)}
    assert {k: after[k] for k in written} == written  # written shards kept as they were, not redone
    _check_exactly_once(out, inputs, baseline)


@pytest.mark.reliability(
    fault="Spot preemption of the A100 node mid-training: drained with the preemption reason and a deadline, then "
          "gone with its processes, disk and model cache; a fresh A100 node joins",
    behaviour="The worker checkpoints at the drain notice (ray.train.get_preemption_info); Ray Train counts a "
              "preemption, not a failure (the run has max_failures=0), and restarts on the new node, which fetches "
              "the base model from the S3 mirror into its own cache; the run resumes from the last checkpoint in "
              "S3 and every step's loss equals an uninterrupted run's")
def test_a100_preemption_mid_training(static_cluster, uninterrupted_training, s3_root, tmp_path):
    from mecpe.pipeline import step_train
    from mecpe.train.driver import run_identity

    ref = uninterrupted_training
    out = ref["out"]
    runs = _out(s3_root, "preempt-runs")
    # no periodic checkpoint before the end: the one the run resumes from can only be the one taken at the notice
    cfg = load_config(None, [*ref["overrides"], f"storage.path={runs}", f"training.save_steps={MAX_STEPS}"])
    run_dir = storage.join(runs, run_identity(cfg, "emotion", f"{out}/data/train.json", f"{out}/data/val.json")[0])
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
