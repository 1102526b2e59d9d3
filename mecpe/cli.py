"""The ``mecpe`` command: one CLI, a subcommand per step. Thin: each calls one library function."""

from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (jobs/configs/*.yaml); defaults when omitted")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.max_steps=20 output_dir=/tmp/x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mecpe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="validate ECF files, split train/val, write JSON + rejects")
    prep.add_argument("--train", required=True, help="training file (local path or s3://)")
    prep.add_argument("--test", help="gold test file, validated and copied")
    prep.add_argument("--out", required=True, help="output directory (local or s3://)")
    prep.add_argument("--split", choices=["random", "reference"], default="random")
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--seed", type=int, default=42)

    ev = sub.add_parser("evaluate", help="official Subtask 2 metric of a prediction file")
    ev.add_argument("--pred", required=True)
    ev.add_argument("--gold", required=True)
    ev.add_argument("--json", dest="json_out", help="write metrics JSON here")
    ev.add_argument("--out-dir", help="write metrics.json, report.md and confusion_matrix.png here")

    tr = sub.add_parser("train", help="QLoRA SFT of the emotion or cause model with Ray Train")
    tr.add_argument("--task", choices=["emotion", "cause"], required=True)
    _add_config_args(tr)

    inf = sub.add_parser("infer", help="two-stage batch inference with Ray Data")
    inf.add_argument("--input", required=True, help="file or folder/prefix of .json/.jsonl (local or s3://)")
    inf.add_argument("--output", required=True, help="output folder or s3:// prefix")
    _add_config_args(inf)

    pipe = sub.add_parser("pipeline", help="prepare -> train emotion -> train cause -> infer -> evaluate")
    _add_config_args(pipe)

    tiny = sub.add_parser("tiny-model", help="build the tiny local Llama-architecture model + tokenizer")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--data", help="ECF data folder (default: MECPE_DATA or ../shared/data/ecf)")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data":
        from mecpe.data import main_prepare

        return main_prepare(args.train, args.test, args.out, args.split, args.val_fraction, args.seed)
    if args.command == "evaluate":
        from mecpe.evaluate import main_evaluate

        return main_evaluate(args.pred, args.gold, args.json_out, args.out_dir)
    if args.command == "train":
        from mecpe.train import main_train

        return main_train(args.config, args.task, args.overrides)
    if args.command == "infer":
        from mecpe.infer import main_infer

        return main_infer(args.config, args.input, args.output, args.overrides)
    if args.command == "pipeline":
        from mecpe.pipeline import main_pipeline

        return main_pipeline(args.config, args.overrides)
    if args.command == "tiny-model":
        from mecpe.config import DataConfig
        from mecpe.modeling import build_tiny_model

        data = DataConfig(data_dir=args.data) if args.data else DataConfig()
        files = [data.path(data.train_file)]
        print(build_tiny_model(args.out, files, seed=args.seed))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
