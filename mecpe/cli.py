"""The ``mecpe`` command: one CLI, a subcommand per step. The only place that parses arguments, prints results and
chooses exit codes (0 done, 2 the input or the config is at fault, 1 anything else); each subcommand calls library
functions that return values and raise errors. ``jobs/*.py`` (``ray job submit`` entrypoints) call ``main``."""

from __future__ import annotations

from types import MappingProxyType
import argparse
import json
import sys

from mecpe import log_to_stdout, pipeline, synth
from mecpe.config import DataConfig, TinyModelSettings, load_config
from mecpe.splits import counts_table
from mecpe.errors import MecpeError
from mecpe.evaluate import Metrics
from mecpe.metric import OFFICIAL_KEYS
from mecpe.report import format_table

EXIT_USER_ERROR = MecpeError.exit_code


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, help="YAML config (jobs/configs/*.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.max_steps=20 output_dir=/tmp/x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mecpe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation and the synthetic corpus")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="validate ECF files, split train/val, write JSON + rejects (into "
                                               "--out, or <output_dir>/data of --config)")
    prep.add_argument("--train", help="training file, folder or prefix (default: data.train_file of the config)")
    prep.add_argument("--test", help="gold test file, validated and copied (default: data.test_file)")
    prep.add_argument("--out", help="output folder (local or s3://; default: <output_dir>/data)")
    prep.add_argument("--split", choices=["random", "reference"], help="default: data.split")
    prep.add_argument("--val-fraction", type=float, help="default: data.val_fraction")
    prep.add_argument("--seed", type=int, help="default: data.seed")
    _add_config_args(prep)
    syn = data_sub.add_parser("synth", help="write the learnable synthetic corpus (train.json, test.json)")
    syn.add_argument("--out", required=True, help="output folder (local or s3://)")
    syn.add_argument("--train", type=int, default=400, help="training conversations")
    syn.add_argument("--test", type=int, default=100, help="test conversations")
    syn.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="the official Subtask 2 metric (+ report): of --pred against --gold, or of "
                                         "a pipeline's inference output (--config)")
    ev.add_argument("--pred", help="Subtask_2_pred.json (default with --config: <output_dir>/inference/...)")
    ev.add_argument("--gold", help="gold file (default with --config: the prepared test split)")
    ev.add_argument("--json", dest="json_out", help="write the metrics as JSON here")
    ev.add_argument("--out-dir", help="write metrics.json, report.md and confusion_matrix.png here")
    _add_config_args(ev)

    tr = sub.add_parser("train", help="QLoRA SFT of the emotion or cause model with Ray Train")
    tr.add_argument("--task", choices=["emotion", "cause"], required=True)
    _add_config_args(tr)

    inf = sub.add_parser("infer", help="two-stage batch inference with Ray Data")
    inf.add_argument("--input", help="file or folder/prefix of .json/.jsonl (local or s3://; default: the prepared "
                                     "test split)")
    inf.add_argument("--output", help="output folder or s3:// prefix (default: <output_dir>/inference)")
    inf.add_argument("--overwrite", action="store_true", help="replace another run's results at --output")
    _add_config_args(inf)

    pipe = sub.add_parser("pipeline", help="prepare -> train emotion -> train cause -> infer -> evaluate")
    _add_config_args(pipe, required=True)

    tiny = sub.add_parser("tiny-model", help="build the tiny local Llama-architecture model + tokenizer")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--data", nargs="+", help="training file(s) (default: data.train_file of the defaults)")
    t = TinyModelSettings()  # the defaults of model.tiny
    tiny.add_argument("--seed", type=int, default=t.seed, help="model.tiny.seed")
    tiny.add_argument("--layers", type=int, default=t.num_layers, help="decoder layers (model.tiny.num_layers)")
    tiny.add_argument("--output-scale", type=float, default=t.output_scale, help="model.tiny.output_scale")
    tiny.add_argument("--pretrain-steps", type=int, default=t.pretrain_steps,
                      help="recap pretraining steps (model.tiny.pretrain_steps)")
    return parser


# ----------------------------------------------------------------------------------------------- commands


def _config(args):
    return load_config(args.config, args.overrides)


def _prepare(args) -> int:
    result = pipeline.step_prepare(_config(args), args.train, args.test, args.out, split=args.split,
                                   val_fraction=args.val_fraction, seed=args.seed)
    print(counts_table(result.splits))
    print(f"rejects: {result.rejects} (see {result.rejects_file})")
    for message in result.file_errors:
        print(f"file error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR if result.train_file_errors else 0


def _synth(args) -> int:
    counts = synth.write_corpus(args.out, num_train=args.train, num_test=args.test, seed=args.seed)
    print(json.dumps(counts, indent=2))
    return 0


def _print_metrics(metrics: Metrics, cause_utterances: int | None = None) -> None:
    print(format_table(metrics))
    if metrics.baselines:
        names = list(metrics.baselines)
        print("\nbeside the rule baselines (report.md has the full table):")
        print(f"  {'metric':<20} {'mecpe':>8}" + "".join(f"  {n}" for n in names))
        for k in OFFICIAL_KEYS:
            print(f"  {k:<20} {getattr(metrics, k):>8.4f}"
                  + "".join(f"  {getattr(b, k):>{len(n)}.4f}" for n, b in metrics.baselines.items()))
    if cause_utterances is not None:
        print(f"\ncause stage: {cause_utterances} utterances predicted non-neutral were asked for their causes")
    if metrics.scope:
        print(metrics.scope)


def _evaluate(args) -> int:
    if args.config:
        evaluated = pipeline.step_evaluate(_config(args), args.pred, args.gold)
        _print_metrics(evaluated.metrics)
        print(f"report: {evaluated.report}")
        return 0
    if not (args.pred and args.gold):
        print("mecpe evaluate: error: --pred and --gold are required without --config", file=sys.stderr)
        return EXIT_USER_ERROR
    evaluated = pipeline.score_files(args.pred, args.gold, json_out=args.json_out, out_dir=args.out_dir)
    _print_metrics(evaluated.metrics)
    if evaluated.report:
        print(f"report written to {evaluated.report}")
    return 0


def _train(args) -> int:
    res = pipeline.step_train(_config(args), args.task)
    print(f"{args.task} adapter: {res.adapter_uri} (run {res.run_name}, step {res.global_step}"
          f"{', already finished' if res.reused else ''})")
    return 0


def _infer(args) -> int:
    inferred = pipeline.step_infer(_config(args), args.input, args.output, overwrite=args.overwrite, score=True)
    summary = inferred.summary
    print(f"{summary.conversations} conversations predicted, {summary.rejects} rejected "
          f"(see {summary.rejects_file}); {summary.pred_file}")
    if inferred.not_scored is not None:
        print(f"not scored: {inferred.not_scored}")
    elif inferred.metrics is not None:
        _print_metrics(inferred.metrics, summary.this_run.stages.cause.utterances)
    return 0


def _bias_line(validation) -> str | None:
    """What became of the emotion bias: applied (its nonzero values), or fitted and left out, with the 2-fold
    estimate that decided it."""
    cal = validation.calibration
    if cal is None:
        return None
    values = ", ".join(f"{k} {b:+.2f}" for k, b in cal.bias.items() if b)
    if cal.applied:
        return f"emotion bias: {values}"
    fold = cal.two_fold
    estimate = (f"2-fold weighted_f1 {fold.before:.4f} -> {fold.after:.4f}" if fold.before is not None
                else "no 2-fold estimate")
    return f"emotion bias: fitted, not applied ({estimate}; fitted {values or 'all zero'})"


def _pipeline(args) -> int:
    res = pipeline.run_pipeline(_config(args))
    print(f"\n== {args.config}: predictions for {res.test_file}, scored against its gold labels ==")
    _print_metrics(res.metrics, res.summary.this_run.stages.cause.utterances)
    val = res.validation
    if val:
        before = val.before_calibration
        raw = f" (uncalibrated {before.weighted_f1:.4f})" if before else ""
        print(f"\nvalidation split ({val.conversations} conversations, where choices are made): weighted_f1 "
              f"{val.metrics.weighted_f1:.4f}{raw}")
        if val.rule_on_own_emotions is not None:
            print(f"  its emotions with the self/previous rule's causes instead of the cause stage's: "
                  f"{val.rule_on_own_emotions:.4f}")
        bias = _bias_line(val)
        if bias:
            print(bias)
    print("\noutputs:")
    for path in res.outputs:
        print(f"  {path}")
    print(f"  emotion adapter: {res.adapters['emotion']}\n  cause adapter:   {res.adapters['cause']}")
    print(f"pipeline finished in {res.timings['total']} s")
    return 0


def _tiny(args) -> int:
    from mecpe.tiny import build_tiny_model  # torch and transformers: imported by this command only

    d = DataConfig()
    print(build_tiny_model(args.out, args.data or [d.path(d.train_file)], seed=args.seed, num_layers=args.layers,
                           output_scale=args.output_scale, pretrain_steps=args.pretrain_steps))
    return 0


COMMANDS = MappingProxyType({"evaluate": _evaluate, "train": _train, "infer": _infer, "pipeline": _pipeline,
                             "tiny-model": _tiny})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stdout()
    run = (_prepare if args.data_command == "prepare" else _synth) if args.command == "data" else \
        COMMANDS[args.command]
    return _run(run, args)


def _run(run, args) -> int:
    """An error a user can cause (``MecpeError``: bad input, bad config, an output of another run, a cluster that
    cannot hold the workers, local paths on a cluster of several machines, a damaged state file of an earlier run)
    ends with one line naming the problem, and the file where there is one, and its exit code; anything else is a
    bug and keeps its traceback."""
    try:
        return run(args)
    except MecpeError as exc:
        print(f"mecpe {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
