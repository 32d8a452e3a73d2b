"""Optimizers whose update step runs on manualbp's backends (reference torch ops or Triton)."""

from manualbp.optim.sgd import SGD

__all__ = ["SGD"]
