"""Triton kernels and their launchers: tensors in, tensors out, no autograd.

Each module holds the ``@triton.jit`` kernels of one op and, right beside
them, the Python launchers that ``manualbp`` calls. Nothing here records an
autograd graph; the hand-derived backward passes live in ``manualbp``.
"""
