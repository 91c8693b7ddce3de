"""Where the Triton kernel tests run: CPU tensors through the interpreter (CI), or a CUDA device
when run with TRITON_INTERPRET=0 on a machine that has one (bf16 only there: the interpreter
computes bf16 arithmetic wrongly). A test module without either is skipped."""

from __future__ import annotations

import pytest
import torch

from kernels._backend import interpreting

if interpreting():
    DEVICE, DTYPES = "cpu", (torch.float32, torch.float16)
elif torch.cuda.is_available():
    DEVICE, DTYPES = "cuda", (torch.float32, torch.float16, torch.bfloat16)
else:
    pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
