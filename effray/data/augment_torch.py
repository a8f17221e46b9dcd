"""The import path ``effray.train.loop`` still uses for on-device augmentation. The one
augmentation library is :mod:`effray.data.augment`; delete this module once the loop
imports ``parse_policy`` and ``augment_on_device`` from there."""

from effray.data.augment import batch_generator
from effray.data.augment import parse_policy as parse_policy_torch

__all__ = ["batch_generator", "parse_policy_torch"]
