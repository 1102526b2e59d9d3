"""The training driver: name the run, return at once when it already finished, else run ``train_loop`` on Ray Train.

Resume: the run name is ``<task>-<hash of everything that shapes the adapter>`` (or ``storage.run_name``), so a
re-run with the same settings uses the same ``RunConfig(storage_path, name)``. Ray Train then restores the run's
checkpoint list and each worker resumes from the newest complete checkpoint (``mecpe.train.recipe``). A finished
run has ``<storage>/<run>/adapter/`` with a completion marker written last; a re-run then returns without starting Ray
Train at all. Node preemptions (a spot node drained with the preemption reason, then gone) are retried against
``scaling.max_preemption_failures``, other worker failures against ``scaling.max_failures``. When Ray Train's
controller itself stops on a storage error (S3 unreachable while it records a checkpoint), the run is started again
after a pause, a few times (``STORAGE_RETRY_WAITS_S``), and resumes from its latest complete checkpoint: a short
storage outage does not end a long job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

from mecpe import cluster, layout, runid, storage
from mecpe.config import Config, dump_config
from mecpe.errors import ConfigError, RunStoppedError
from mecpe.train.examples import TASKS, normalize_predictions
from mecpe.layout import TrainRunLayout
from mecpe.train.recipe import TrainLoopSpec, train_loop

STORAGE_RETRY_WAITS_S = (5, 20, 60)  # pauses before starting a run again after a controller storage error
# Training settings that do not change the adapter (bookkeeping; how many adapters the pipeline trains), left out of
# the run hash.
_NOT_HASHED = frozenset({"save_steps", "num_to_keep", "logging_steps", "eval_steps", "use_liger_kernel",
                         "emotion_ensemble"})

log = logging.getLogger("mecpe.train")


@dataclass
class TrainResult:
    run_name: str
    run_dir: str  # <storage.path>/<run_name>: Ray Train's run folder (checkpoints) and the adapter
    adapter_uri: str  # <run_dir>/adapter/
    metrics: dict = field(default_factory=dict)
    global_step: int = 0
    config_hash: str = ""
    reused: bool = False  # True: the run had already finished; nothing was trained
    restarts: list[str] = field(default_factory=list)  # storage errors after which the run was started again


def run_identity(cfg: Config, task: str, train_uri: str, val_uri: str | None,
                 predicted: Mapping | None = None) -> tuple[str, str]:
    """(run name, config hash): task + hash of model, data (input content), prompt, quantization, LoRA and training
    hyperparameters. Storage, scaling and bookkeeping keys (``_NOT_HASHED``) are left out, so a run can resume on
    another cluster size or with another checkpoint cadence."""
    d = cfg.data
    parts = {
        "task": task,
        "model": runid.model_part(cfg.model),
        "data": {"split": d.split, "val_fraction": d.val_fraction, "seed": d.seed, "limit_train": d.limit_train,
                 "limit_val": d.limit_val,
                 "train_sha256": list(runid.file_digests([train_uri]).values()),
                 "val_sha256": list(runid.file_digests([val_uri]).values()) if val_uri else None},
        "prompt": cfg.prompt.model_dump(mode="json"), "quantization": cfg.quantization.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "training": cfg.training.model_dump(mode="json", exclude=_NOT_HASHED),
    }
    if task == "emotion":  # the cause-only settings do not shape an emotion adapter
        for key in ("cause_emotions", "cause_noise_rate"):
            parts["training"].pop(key)
    elif cfg.training.cause_emotions == "predicted":
        parts["predicted_emotions"] = runid.run_id({k: {str(u): v for u, v in utts.items()}
                                                    for k, utts in (predicted or {}).items()}, length=16)
    chash = runid.run_id(parts)
    return cfg.storage.run_name or f"{task}-{chash}", chash


def finished_result(run_dir: str) -> TrainResult | None:
    """The result of a run whose adapter is complete (marker present), else None."""
    adapter = TrainRunLayout(run_dir).adapter
    if not storage.exists(layout.adapter_marker(adapter)):
        return None
    meta = layout.read_training_meta(adapter)
    return TrainResult(run_name=meta["run_name"], run_dir=run_dir, adapter_uri=adapter,
                       metrics={**meta.get("metrics", {}), "log_history": meta.get("log_history", [])},
                       global_step=int(meta["global_step"]), config_hash=meta.get("config_hash", ""))


def loop_spec(cfg: Config, task: str, run_name: str, config_hash: str, run_dir: str, train_uri: str,
              val_uri: str | None, predicted: Mapping | None, settings: storage.S3Settings) -> TrainLoopSpec:
    """What the training loop uses of the experiment's config, and nothing else."""
    return TrainLoopSpec(
        task=task, run_name=run_name, run_uri=run_dir, config_hash=config_hash, train_uri=train_uri, val_uri=val_uri,
        limit_train=cfg.data.limit_train, limit_val=cfg.data.limit_val, model=cfg.model,
        quantization=cfg.quantization, lora=cfg.lora, prompt=cfg.prompt, training=cfg.training,
        use_gpu=cfg.scaling.use_gpu, storage_settings=settings.as_dict(),
        predicted_emotions=dict(predicted) if predicted else None, config_record=dump_config(cfg))


def worker_bundle(cfg: Config) -> dict[str, float]:
    """The resources one training worker asks for (as Ray Train's ScalingConfig computes them)."""
    sc = cfg.scaling
    bundle = {k: v for k, v in (sc.resources_per_worker or ({"GPU": 1} if sc.use_gpu else {"CPU": 1})).items() if v}
    if sc.use_gpu:
        bundle.setdefault("GPU", 1)
    if sc.accelerator_type:
        bundle[f"accelerator_type:{sc.accelerator_type}"] = 0.001
    return bundle


def run_training(cfg: Config, task: str, *, train_convs_uri: str | None = None, val_convs_uri: str | None = None,
                 predicted_emotions: Mapping | str | list | None = None) -> TrainResult:
    """Train (or resume, or just return) the ``task`` adapter of ``cfg``; see the module docstring.

    Splits default to ``<output_dir>/data/{train,val}.json`` (``mecpe.data.prepare``); a missing val split means no
    validation loss. ``predicted_emotions`` (cause task with ``training.cause_emotions=predicted``): a mapping
    ``{conversation_id: {utterance_id: label}}``, a list of official-format prediction records, or a JSON URI."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    settings = storage.settings_from(cfg.storage)
    with storage.using(settings):
        return _run(cfg, task, train_convs_uri, val_convs_uri, predicted_emotions, settings)


def _run(cfg: Config, task: str, train_uri: str | None, val_uri: str | None, predicted_emotions,
         settings: storage.S3Settings) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    explicit_val = val_uri is not None
    train_uri = train_uri or layout.RunLayout(cfg.output_dir).split("train")
    val_uri = val_uri or layout.RunLayout(cfg.output_dir).split("val")
    if not explicit_val and not storage.exists(val_uri):
        val_uri = None
    predicted = None
    if task == "cause" and cfg.training.cause_emotions == "predicted":
        if predicted_emotions is None:
            raise ConfigError("training.cause_emotions=predicted needs predicted_emotions (mapping or JSON file)")
        predicted = normalize_predictions(predicted_emotions)

    run_name, chash = run_identity(cfg, task, train_uri, val_uri, predicted)
    run_dir = storage.join(cfg.storage.path, run_name)
    done = finished_result(run_dir)
    if done is not None:
        log.info("run %s already finished (step %d); adapter: %s", run_name, done.global_step, done.adapter_uri)
        done.reused = True
        return done

    cluster.connect(cfg.ray_address)
    cluster.check_shared_paths({"storage.path": cfg.storage.path, "model.base": cfg.model.base,
                                **cluster.named_by(cfg.output_dir, "output_dir", {"training data": train_uri,
                                                                                  "validation data": val_uri})},
                               cfg.storage.shared_filesystem)
    cluster.check_schedulable(worker_bundle(cfg), f"training ({task})", count=cfg.scaling.num_workers)
    fs, fs_path = storage.get_filesystem(cfg.storage.path, settings)
    sc = cfg.scaling
    remote = storage.is_remote(cfg.storage.path)

    spec = loop_spec(cfg, task, run_name, chash, run_dir, train_uri, val_uri, predicted, settings)

    def new_trainer() -> TorchTrainer:  # one per attempt
        return TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec},
            scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                         resources_per_worker=sc.resources_per_worker,
                                         accelerator_type=sc.accelerator_type),
            run_config=RunConfig(
                name=run_name, storage_path=fs_path, storage_filesystem=fs if remote else None,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.num_to_keep),
                failure_config=FailureConfig(max_failures=sc.max_failures,
                                             max_preemption_failures=sc.max_preemption_failures),
                # Ray Train's print patch tees every print twice and leaks output that libraries capture from stdout
                # (dill's dis.dis in datasets' fingerprinting): workers print plainly.
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        )

    log.info("training %s run %s -> %s", task, run_name, run_dir)
    error_uri = TrainRunLayout(run_dir).error
    if storage.exists(error_uri):
        storage.delete(error_uri)  # from an earlier attempt; this one may fare better (another GPU)
    restarts: list[str] = []
    for wait in (*STORAGE_RETRY_WAITS_S, None):
        try:
            error = new_trainer().fit().error
        except Exception as exc:  # noqa: BLE001 - fit raises some failures and returns others
            error = exc
        if error is None:
            break
        if wait is None or not _storage_error(error):
            raise error
        restarts.append(f"{type(error).__name__}: {_first_line(error)}")
        log.warning("Ray Train stopped on a storage error (%s); starting run %s again in %d s (restart %d of %d): it "
                    "resumes from its latest complete checkpoint", _first_line(error), run_name, wait, len(restarts),
                    len(STORAGE_RETRY_WAITS_S))
        time.sleep(wait)
    done = finished_result(run_dir)
    if done is None and storage.exists(error_uri):
        raise RunStoppedError(f"run {run_name}: {storage.read_state(error_uri)['message']}")
    if done is None:
        raise RuntimeError(f"run {run_name} ended without a complete adapter at {TrainRunLayout(run_dir).adapter}")
    done.restarts = restarts
    return done


def _storage_error(error: BaseException) -> bool:
    """Ray Train's controller failed on storage I/O (``ControllerError`` carrying an ``OSError``): transient outages
    of S3 look like this; a new attempt resumes from storage. Worker errors are Ray Train's to retry."""
    from ray.train import ControllerError

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, OSError)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines()[1:] if line.strip()), str(error))[:300]
