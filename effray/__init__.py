"""effray: train, compress and measure CIFAR image classifiers on Ray."""

__version__ = "0.1.0"
