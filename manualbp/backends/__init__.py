"""Kept for code written against earlier releases: ``manualbp.backends.linear_choice`` is
``manualbp.kernels.linear``'s choice between the Triton and cuBLAS Linear candidates."""
