"""Train, evaluate, inspect, export and serve MNIST-family digit classifiers with PyTorch."""

__version__ = "0.1.0"
