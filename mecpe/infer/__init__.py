"""Two-stage batch inference with Ray Data: emotions, then causes, streamed from input files to JSON shards.

    source.py   which input files, and the datasource that reads them as raw rows
    rows.py     the Arrow rows the stages exchange, and their conversions
    stages.py   the map stages: parse, emotion / cause predictors
    writer.py   the last stage: one atomic shard per batch
    resume.py   the output folder: run identity, what is done, assembly of Subtask_2_pred.json
    summary.py  InferenceSummary, what a run returns and writes as summary.json
    driver.py   run_inference: the Ray Data pipeline and the summary
"""

from mecpe.errors import RunMismatchError
from mecpe.infer.driver import run_inference

__all__ = ("RunMismatchError", "run_inference")
