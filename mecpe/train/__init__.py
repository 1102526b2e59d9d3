"""QLoRA supervised fine-tuning of the emotion or the cause model as a Ray Train job.

    examples.py     training examples (prompt ids, answer-only labels) and token-budget batches
    recipe.py       train_loop: what each Ray Train worker runs, top to bottom
    callbacks.py    Trainer callbacks: throughput, TensorBoard sync, checkpoint manifests, preemption checkpoint
    checkpoints.py  checkpoint manifests, the scan of stored checkpoints, the choice of the one to resume from
    driver.py       run_training: run name, TorchTrainer, result
"""

from mecpe.train.driver import TrainResult, run_training

__all__ = ("TrainResult", "run_training")
