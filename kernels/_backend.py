"""Backend selection shared by every public op: "auto" | "torch" | "triton".

The only module of the project that reads TRITON_INTERPRET: under it, Triton kernels run on CPU
tensors through Triton's interpreter (how CI tests them), with one fixed launch configuration.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, op: str) -> Literal["torch", "triton"]:
    """Triton for CUDA tensors under "auto", the torch reference otherwise.

    Raises ValueError for an unknown backend name, RuntimeError when Triton is asked for and
    cannot run on these tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' but the triton package is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{op}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1")
    return backend  # type: ignore[return-value]


def num_sms(device: torch.device) -> int:
    """Multiprocessors to plan grids for; a small fixed number when interpreting on the CPU."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def cuda_capability(device: torch.device) -> int:
    """The major compute capability of a CUDA device (9 on Hopper), cached per device."""
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_capability(index: int) -> int:
    return int(torch.cuda.get_device_capability(index)[0])
