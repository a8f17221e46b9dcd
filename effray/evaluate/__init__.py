"""Scoring a model as it will be used: ``effray evaluate`` (accuracy, per-class
precision/recall/F1, confusion, calibration), CIFAR-10-C-style corruptions and the
robustness under them. Above compression: it scores compressed artifacts too."""

from effray.evaluate.run import EvaluateConfig, evaluate, score

__all__ = ["EvaluateConfig", "evaluate", "score"]
