"""Triton kernels on a CPU machine: the interpreter, set only while a kernel test module needs it.

`triton.jit` picks the interpreter when a kernel is decorated (its module is imported) and
the interpreter reads TRITON_INTERPRET again while kernels run. Left in os.environ, the
variable leaks into every process a later test starts (cluster workers, benchmarks), which
would then interpret their kernels too. So a kernel test module imports the kernel modules
inside `interpreter_env()` and runs its tests under the module fixture `interpreter`, each
of which sets the variable on a machine without CUDA and restores the environment after.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
USER_SET = "TRITON_INTERPRET" in os.environ     # the run's own setting, kept as it is


@contextlib.contextmanager
def interpreter_env():
    if ON_GPU:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module", autouse=False)
def interpreter():
    with interpreter_env():
        yield
