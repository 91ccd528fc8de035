"""craft-runner: compression-aware training, from one config to a paper table."""

__version__ = "0.1.0"
