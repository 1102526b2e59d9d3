"""mecpe: emotion-cause pair extraction (SemEval-2024 Task 3 Subtask 2) with QLoRA fine-tunes on Ray."""

__version__ = "0.1.0"
