"""Two-stage batch inference with Ray Data: emotions, then causes, streamed from input files to JSON shards.

    source.py   which input files, and the datasource that reads them as raw rows
    stages.py   the map stages: parse, emotion / cause predictors, shard writer
    resume.py   the output folder: run identity, what is done, assembly of Subtask_2_pred.json
    driver.py   run_inference: the Ray Data pipeline and the summary
"""

from mecpe.infer.driver import run_inference
from mecpe.errors import RunMismatchError

__all__ = ("RunMismatchError", "run_inference")
