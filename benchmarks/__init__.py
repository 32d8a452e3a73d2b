"""Benchmarks of manualbp against eager PyTorch and ``torch.compile``.

``python -m benchmarks`` runs the suite (see :mod:`benchmarks.runner`); ``pytest benchmarks/``
runs the same cases under pytest-benchmark. Neither is part of the default test run.
"""
