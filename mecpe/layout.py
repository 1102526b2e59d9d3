"""Where every artefact of a run lives: the one module that names mecpe's files and folders.

Three folders, each a small frozen object built from its root (a local folder or an s3:// prefix):

    RunLayout(output_dir)            what a pipeline writes under ``output_dir``
      data/{train,val,test}.json, test-first-N.json, rejects.jsonl, manifest.json     prepare
      validation/{raw/,inference/,calibration.json,metrics.json}                      validate
      inference/                                                                      an InferenceLayout
      Subtask_2_pred.json, metrics.json, report.md, confusion_matrix.png,
      learning_curves.png, pipeline.json, config.yaml                                 evaluate, pipeline
    InferenceLayout(output)          one inference output (``mecpe infer --output``)
      _run.json, records/, rejects/, Subtask_2_pred.json, gold.json, rejects.jsonl, summary.json
    TrainRunLayout(storage.path/run) one training run
      adapter/ (with mecpe_train.json and, last, .mecpe_train_complete), mecpe_error.json, checkpoints

Moving an artefact means editing this file only; ``tests/test_architecture.py`` checks that no other module of mecpe
spells one of these names. Only ``storage.join`` is used: no I/O here except ``read_training_meta``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mecpe import storage

# report files, written by evaluate.write_report into any folder (the pipeline's output_dir, validation/inference)
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CONFUSION_FILE = "confusion_matrix.png"
CURVES_FILE = "learning_curves.png"
PRED_FILE = "Subtask_2_pred.json"  # the official submission file name
REJECTS_FILE = "rejects.jsonl"

# a training run's adapter folder
ADAPTER_DIR = "adapter"
TRAIN_META_FILE = "mecpe_train.json"  # what trained the adapter: task, run, step, metrics, log history
TRAIN_COMPLETE_MARKER = ".mecpe_train_complete"  # written last into the adapter folder
TRAIN_ERROR_FILE = "mecpe_error.json"  # in the run folder: why the last attempt stopped without an adapter
CONFIG_FILE = "config.yaml"  # the resolved config: beside an adapter's weights, and in a pipeline's output_dir


def _join(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


@dataclass(frozen=True)
class InferenceLayout:
    """One inference output folder: the run's claim, the shards it appends, what assembly writes."""

    root: str
    RUN_FILE = "_run.json"  # the run identity, written before any work (mecpe.infer.resume)
    RECORDS_DIR = "records"
    REJECTS_DIR = "rejects"
    GOLD_FILE = "gold.json"  # the gold labels of the predicted conversations, when the input carried them
    SUMMARY_FILE = "summary.json"

    @property
    def run_file(self) -> str:
        return _join(self.root, self.RUN_FILE)

    @property
    def records(self) -> str:
        return _join(self.root, self.RECORDS_DIR)

    @property
    def rejects_dir(self) -> str:
        return _join(self.root, self.REJECTS_DIR)

    @property
    def pred(self) -> str:
        return _join(self.root, PRED_FILE)

    @property
    def gold(self) -> str:
        return _join(self.root, self.GOLD_FILE)

    @property
    def rejects(self) -> str:
        return _join(self.root, REJECTS_FILE)

    @property
    def summary(self) -> str:
        return _join(self.root, self.SUMMARY_FILE)

    def result_files(self) -> tuple[str, ...]:
        """Every file name that assembly or scoring writes here (deleted with the run on overwrite)."""
        return (PRED_FILE, self.GOLD_FILE, REJECTS_FILE, self.SUMMARY_FILE, METRICS_FILE, REPORT_FILE,
                CONFUSION_FILE, self.RUN_FILE)


@dataclass(frozen=True)
class DataLayout:
    """A prepared data folder (``mecpe data prepare``): the splits, what was set aside, the manifest."""

    root: str
    MANIFEST_FILE = "manifest.json"  # inputs' sha256, settings, outputs' sha256: written last

    @staticmethod
    def split_file(name: str) -> str:
        return f"{name}.json"

    def split(self, name: str) -> str:
        """A prepared split: ``train``, ``val``, ``test`` (and ``reference_test``)."""
        return _join(self.root, self.split_file(name))

    def first(self, name: str, n: int) -> str:
        """The first ``n`` conversations of a prepared split (``data.limit_*``)."""
        return _join(self.root, f"{name}-first-{n}.json")

    @property
    def rejects(self) -> str:
        return _join(self.root, REJECTS_FILE)

    @property
    def manifest(self) -> str:
        return _join(self.root, self.MANIFEST_FILE)


@dataclass(frozen=True)
class RunLayout:
    """What a pipeline (and each of its steps) writes under ``output_dir``."""

    root: str

    @property
    def data(self) -> DataLayout:
        return DataLayout(_join(self.root, "data"))

    def split(self, name: str) -> str:
        return self.data.split(name)

    @property
    def inference(self) -> InferenceLayout:
        return InferenceLayout(_join(self.root, "inference"))

    @property
    def validation(self) -> str:
        return _join(self.root, "validation")

    @property
    def validation_raw(self) -> InferenceLayout:
        """The validation split inferred without the fitted bias, whose label scores the bias is fitted on."""
        return InferenceLayout(_join(self.validation, "raw"))

    @property
    def validation_inference(self) -> InferenceLayout:
        return InferenceLayout(_join(self.validation, "inference"))

    @property
    def calibration(self) -> str:
        return _join(self.validation, "calibration.json")

    @property
    def validation_metrics(self) -> str:
        return _join(self.validation, METRICS_FILE)

    @property
    def pred(self) -> str:
        return _join(self.root, PRED_FILE)

    @property
    def metrics(self) -> str:
        return _join(self.root, METRICS_FILE)

    @property
    def report(self) -> str:
        return _join(self.root, REPORT_FILE)

    @property
    def pipeline_record(self) -> str:
        return _join(self.root, "pipeline.json")

    @property
    def config(self) -> str:
        return _join(self.root, CONFIG_FILE)

    def listing(self, validation: bool) -> tuple[str, ...]:
        """What a finished pipeline leaves in ``output_dir``, for the CLI to print."""
        return (PRED_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE, CURVES_FILE, "pipeline.json", "data/",
                "inference/") + (("validation/",) if validation else ())


@dataclass(frozen=True)
class TrainRunLayout:
    """One training run under ``storage.path``: Ray Train's checkpoints, the adapter, the last error."""

    root: str

    @property
    def adapter(self) -> str:
        return _join(self.root, ADAPTER_DIR)

    @property
    def error(self) -> str:
        return _join(self.root, TRAIN_ERROR_FILE)


def adapter_meta(adapter: str) -> str:
    return _join(adapter, TRAIN_META_FILE)


def adapter_marker(adapter: str) -> str:
    return _join(adapter, TRAIN_COMPLETE_MARKER)


def read_training_meta(adapter: str | None) -> dict | None:
    """What trained an adapter (``mecpe_train.json``), or None for no adapter or one mecpe did not train: the one
    reader, for the run's reuse, the inference run id and the report."""
    if not adapter or not storage.exists(adapter_meta(adapter)):
        return None
    return storage.read_state(adapter_meta(adapter))
