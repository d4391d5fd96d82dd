"""Where this room's Triton kernels run (rope.py, rmsnorm.py, glu.py), asked in one place.

    if triton_gpu.runs_on(x) and _kernels() is not None: ...   # each kernel file's available(x)

A CUDA tensor on an Ampere or newer GPU: the GPUs the kernels were measured on (a T4 keeps the
torch formulas). Under Triton's interpreter (TRITON_INTERPRET=1, the tests on CPU) any tensor.
Whether Triton itself imports, and the kernels compile, each file says with its own _kernels().
"""

from __future__ import annotations

import functools
import os

import torch


def runs_on(x: torch.Tensor) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return x.is_cuda and _capable(x.device.index)


@functools.cache
def _capable(index: int | None) -> bool:  # asked by every layer of every forward: once per device
    return torch.cuda.get_device_capability(index) >= (8, 0)
