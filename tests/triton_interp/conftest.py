"""Tests of the Triton kernels on CPU under TRITON_INTERPRET=1.

The interpreter must be chosen before any kernel module is decorated, i.e. for the whole process,
so the main test run does not collect this directory: tests/ops/test_triton.py runs it in a
subprocess with TRITON_INTERPRET=1. To run it directly:

    TRITON_INTERPRET=1 python -m pytest tests/triton_interp
"""
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
