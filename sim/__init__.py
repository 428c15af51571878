"""sim: a discrete-event simulator of GPU memory in large language model training."""

__version__ = "0.1.0"
