"""The ops: each file holds one op's hand-derived reference math (its spec), its
``autograd.Function`` and its validated entry point (re-exported by :mod:`manualbp.functional`).
Kernels for the Triton path are in ``manualbp.kernels`` (the repository's ``triton_kernels/``)."""
