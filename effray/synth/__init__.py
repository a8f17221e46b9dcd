"""Data synthesis: a class-conditional GAN trained on Ray Train, sampled with Ray Data
into effray's canonical dataset, and scored with our own classifier.

Importing the package registers the generator's checkpoint format.
"""

from effray.synth import train as _train  # noqa: F401  (registers effray.synth.generator/1)
