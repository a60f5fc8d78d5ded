"""Triton kernels (installed as `fastres.kernels`): @triton.jit code and configs only, no torch glue."""
