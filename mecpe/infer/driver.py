"""The inference driver: one streaming Ray Data execution per run, then the output files.

    read_raw (mecpe.infer.source) -> ParseStage -> EmotionPredictor -> CausePredictor -> ShardWriter
                                                (or one EmotionCausePredictor with inference.share_base)

The driver never holds the dataset: it iterates over the writer's per-shard rows (counts and timings) only, then
assembles ``Subtask_2_pred.json``, ``rejects.jsonl``, ``summary.json`` (and ``gold.json`` for labelled input) from
the shards (``mecpe.infer.resume``). Scoring is not its job: ``mecpe.evaluate`` scores the files it wrote.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

from mecpe import cluster, layout, storage
from mecpe.config import Config
from mecpe.errors import ConfigError
from mecpe.infer.resume import STAGES, assemble, claim_output, done_uids, run_identity
from mecpe.infer.source import LIGHT_CPUS, list_inputs, read_raw
from mecpe.layout import InferenceLayout
from mecpe.provenance import code_version
from mecpe.infer.rows import merge_engine
from mecpe.infer.summary import InferenceSummary, Resources, Stages, StageSummary, ThisRun
from mecpe.infer.stages import CausePredictor, EmotionCausePredictor, EmotionPredictor, ParseStage, PredictorSpec
from mecpe.infer.writer import ShardWriter

log = logging.getLogger("mecpe.infer")


@dataclass
class StageResources:
    """What each predictor actor asks for, and how many there are (engine settings: ``inference.*``)."""

    num_actors: int
    num_gpus: float
    num_cpus: float
    accelerator_type: str | None
    batch_size: int

    def bundle(self) -> dict[str, float]:
        out = {"CPU": self.num_cpus, "GPU": self.num_gpus}
        if self.accelerator_type:
            out[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return out


def stage_resources(cfg: Config) -> StageResources:
    inf = cfg.inference
    # CPU inference has no accelerator to ask for
    return StageResources(inf.num_actors, inf.num_gpus, inf.num_cpus,
                          inf.accelerator_type if inf.num_gpus > 0 else None, inf.batch_size)


def predictor_spec(cfg: Config, settings: storage.S3Settings) -> PredictorSpec:
    """What the predictor actors use of the experiment's config, and nothing else."""
    inf = cfg.inference
    bias = inf.bias_vector()
    return PredictorSpec(model=cfg.model, quantization=cfg.quantization,
                         adapters={"emotion": inf.emotion_adapter, "cause": inf.cause_adapter},
                         emotion_ensemble=tuple(inf.emotion_ensemble),
                         emotion_ensemble_mode=inf.emotion_ensemble_mode,
                         prompt=cfg.prompt, emotion_method=inf.emotion_method,
                         emotion_bias=tuple(bias) if bias is not None else None, cause_input=inf.cause_input,
                         max_new_tokens=inf.max_new_tokens, max_batch_tokens=inf.max_batch_tokens,
                         reuse_prefix=inf.reuse_prefix, storage_settings=settings.as_dict(),
                         merge_adapters=inf.merge_adapters, gpu_memory_gib=inf.gpu_memory_gib,
                         decode_step=inf.decode_step, prefill_attention=inf.prefill_attention,
                         liger_kernels=inf.liger_kernels)


def check_adapter_layouts(cfg: Config) -> None:
    """An adapter answers the prompt layout it was trained on: refuse one of another layout (``ConfigError`` naming
    the adapter and both layouts). Adapters trained before ``prompt.layout`` existed record none: ``question``."""
    for key, uri in cfg.inference.adapter_keys():
        meta = layout.read_training_meta(uri)
        if meta is None:  # no adapter, or one mecpe did not train: nothing recorded to compare
            continue
        trained = (meta.get("prompt") or {}).get("layout", "question")
        if trained != cfg.prompt.layout:
            raise ConfigError(f"{key}={uri} was trained with prompt.layout={trained} ({layout.adapter_meta(uri)}), "
                              f"and this run asks prompt.layout={cfg.prompt.layout}: set prompt.layout={trained}, or "
                              f"train adapters with prompt.layout={cfg.prompt.layout}")


def _fit_cpu_actors(res: StageResources, pools: int) -> StageResources:
    """On a CPU-only cluster too small for the configured actors (e.g. a 2-core laptop), shrink their CPU request
    so the light read/parse/write stages can still be scheduled (otherwise the pipeline waits forever)."""
    import ray

    if res.num_gpus > 0:
        return res
    total = float(ray.cluster_resources().get("CPU", 0.0))
    need = res.num_cpus * res.num_actors * pools + 3 * LIGHT_CPUS
    if total and need > total:
        per = max(0.05, round((total - 3 * LIGHT_CPUS) / (res.num_actors * pools), 2))
        log.info("%g CPUs cannot hold %d predictor actors x %g CPU + the I/O stages; asking %g CPU per actor", total,
                 res.num_actors * pools, res.num_cpus, per)
        res = StageResources(res.num_actors, res.num_gpus, per, res.accelerator_type, res.batch_size)
    return res


def build_dataset(cfg: Config, files: list[str], output_uri: str, done_ref, res: StageResources,
                  settings: storage.S3Settings):
    """The lazy Ray Data pipeline (nothing runs until it is iterated)."""
    from ray.data import ActorPoolStrategy

    settings_dict = settings.as_dict()
    # Read blocks hold at most one predictor batch: a map task hands its output on only when it ends, so bigger
    # blocks would move through every stage, and reach the writer, as a whole. This keeps memory flat and makes
    # shards, and so resume, per batch. (Ray's streaming repartition would do it too, but as 1-CPU tasks that a
    # small CPU-only node cannot schedule next to the actors.)
    ds = read_raw(files, lines_per_block=max(1, min(cfg.inference.lines_per_block, res.batch_size)))
    ds = ds.map_batches(ParseStage(done_ref), batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    predictor_kw = dict(batch_size=res.batch_size, batch_format="pyarrow", num_cpus=res.num_cpus,
                        compute=ActorPoolStrategy(size=res.num_actors),
                        fn_constructor_kwargs={"spec": predictor_spec(cfg, settings)},
                        udf_modifying_row_count=False)
    if res.num_gpus > 0:
        predictor_kw["num_gpus"] = res.num_gpus
    if res.accelerator_type:
        predictor_kw["accelerator_type"] = res.accelerator_type
    if cfg.inference.share_base:
        ds = ds.map_batches(EmotionCausePredictor, **predictor_kw)
    else:
        ds = ds.map_batches(EmotionPredictor, **predictor_kw)
        ds = ds.map_batches(CausePredictor, **predictor_kw)
    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"output_uri": output_uri,
                                                              "storage_settings": settings_dict,
                                                              "rules": list(cfg.inference.rule_causes)},
                          batch_size=res.batch_size, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          compute=ActorPoolStrategy(min_size=1, max_size=max(1, res.num_actors)))


def _counts(engine: dict) -> dict:
    """Engine counters as JSON shows them: counts as integers, seconds rounded (they travel as float64)."""
    return {stage: [round(x, 3) for x in v] if stage == "load_s" else
            {k: int(x) if float(x).is_integer() else round(x, 3) for k, x in v.items()} for stage, v in engine.items()}


def _rate(n: int, s: float) -> float | None:
    return round(n / s, 2) if s > 0 else None


def run_inference(cfg: Config, input_uri: str | list[str], output_uri: str, *,
                  overwrite: bool = False) -> InferenceSummary:
    """Predict emotions and causes for every conversation of ``input_uri``; write everything under ``output_uri``;
    resume a crashed run of the same configuration (``mecpe.infer.resume``). Returns the summary."""
    settings = storage.settings_from(cfg.storage)
    with storage.using(settings):
        return _run(cfg, input_uri, output_uri, overwrite, settings)


def _run(cfg: Config, input_uri, output_uri: str, overwrite: bool, settings: storage.S3Settings) -> InferenceSummary:
    import ray

    import mecpe

    t0 = time.time()
    files = list_inputs(input_uri, exclude=output_uri)
    shas = {f: storage.sha256(f) for f in files}
    ident = run_identity(cfg, files, shas)
    check_adapter_layouts(cfg)
    cluster.connect(cfg.ray_address)
    inf = cfg.inference
    cluster.check_shared_paths({**cluster.named_by(cfg.output_dir, "output_dir", {"--input": files,
                                                                                  "--output": output_uri}),
                                "model.base": cfg.model.base, **dict(inf.adapter_keys())},
                               cfg.storage.shared_filesystem)
    pools = 1 if cfg.inference.share_base else 2  # one actor pool per stage, or one for both
    res = _fit_cpu_actors(stage_resources(cfg), pools)
    cluster.check_schedulable(res.bundle(), "inference", count=res.num_actors * pools)
    resumed = claim_output(output_uri, ident, overwrite)
    done = done_uids(output_uri) if resumed else set()
    if done:
        log.info("resuming run %s: %d conversations already done", ident["run_id"], len(done))
    done_ref = ray.put(frozenset(done)) if done else None
    ds = build_dataset(cfg, files, output_uri, done_ref, res, settings)

    this_run = Counter()
    secs = {"emotion": 0.0, "cause": 0.0}
    engine: dict = {}
    gpu_peak = 0.0
    t_pipe = last_log = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            this_run["shards"] += 1
            for k in ("records", "rejects", "emotion_utterances", "cause_utterances"):
                this_run[k] += row[k]
            secs["emotion"] += row["emotion_s"]
            secs["cause"] += row["cause_s"]
            gpu_peak = max(gpu_peak, row["gpu_peak_gib"] or 0.0)
            merge_engine(engine, row["engine"])
        if time.time() - last_log >= 10:  # progress on long runs, at most one line per 10 s
            last_log = time.time()
            log.info("progress: %d conversations predicted, %d rejected, %d shards this run (%d done before), "
                     "%.0f s", this_run["records"], this_run["rejects"], this_run["shards"], len(done),
                     last_log - t_pipe)
    pipe_s = time.time() - t_pipe
    del done_ref

    asm = assemble(output_uri)
    out = InferenceLayout(output_uri)
    public = ("source", "location", "conversation_id", "reason", "field", "stage", "retryable")
    storage.write_bytes(out.rejects,
                        storage.dumps_jsonl({k: r.get(k) for k in public} for r in asm.rejects))
    stages = Stages(*(StageSummary(this_run[f"{stage}_utterances"], round(secs[stage], 2),
                                   _rate(this_run[f"{stage}_utterances"], secs[stage])) for stage in STAGES))
    summary = InferenceSummary(
        run_id=ident["run_id"], output=output_uri, conversations=asm.conversations, utterances=asm.utterances,
        rejects=len(asm.rejects), rejects_by_stage=dict(Counter(r["stage"] for r in asm.rejects)),
        retryable_rejects=sum(1 for r in asm.rejects if r.get("retryable")), parse_status=asm.parse_status,
        dropped_utterances=asm.dropped, duplicate_shard_copies_ignored=asm.duplicates_in_shards, resumed=bool(done),
        done_before_this_run=len(done),
        this_run=ThisRun(shards=this_run["shards"], records=this_run["records"], rejects=this_run["rejects"],
                         pipeline_s=round(pipe_s, 2), stages=stages,
                         utt_per_s=_rate(this_run["emotion_utterances"], pipe_s), gpu_peak_gib=gpu_peak,
                         engine=_counts(engine),
                         resources=Resources(res.num_actors, res.num_gpus, res.num_cpus, res.accelerator_type,
                                             res.batch_size, cfg.inference.share_base)),
        wall_s=round(time.time() - t0, 2), has_gold=asm.has_gold,
        provenance={"base_model": cfg.model.base, "revision": cfg.model.revision, "adapters": ident["adapters"],
                    "quantization": ident["quantization"], "mecpe_version": mecpe.__version__, "code": code_version(),
                    "inputs": ident["inputs"], "python": sys.version.split()[0], "ray": ray.__version__},
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    storage.write_json(out.summary, asdict(summary), indent=2)
    log.info("read+parse: %d file(s), %d conversations, %d rejects (%d done before this run)", len(files),
             summary.conversations, summary.rejects, len(done))
    for stage in STAGES:
        st = getattr(stages, stage)
        log.info("%s: %d utterances this run, %s utt/s per actor, parse status %s", stage, st.utterances,
                 st.utt_per_s_per_actor, asm.parse_status[stage])
    log.info("write: %d shards this run; %s, %s, %s (%s s)", this_run["shards"], out.pred, out.rejects, out.summary,
             summary.wall_s)
    return summary
