"""``manualbp.backends.linear_choice.force`` as documented before: now in
``manualbp.kernels.linear`` (the candidates) and ``manualbp.kernels._tuning`` (the decisions)."""

from manualbp.kernels._tuning import CACHE_ENV, TIMED_RUNS, WARMUP_RUNS, clear, decisions, use_timer
from manualbp.kernels.linear import IMPL_ENV, IMPLS, force, mode

__all__ = ["CACHE_ENV", "IMPLS", "IMPL_ENV", "TIMED_RUNS", "WARMUP_RUNS", "clear", "decisions",
           "force", "mode", "use_timer"]  # fmt: skip
