"""Backend selection shared by every public op: "auto" | "torch" | "triton"."""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, op: str) -> Literal["torch", "triton"]:
    """Triton for CUDA tensors under "auto", the torch reference otherwise.

    Raises ValueError for an unknown backend name, NotImplementedError when Triton is asked for
    and no Triton kernel of `op` exists yet.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _has_triton(op) else "torch"
    if backend == "triton" and not _has_triton(op):
        raise NotImplementedError(f"{op}: no Triton kernel yet (issue #3); use backend='torch'")
    return backend  # type: ignore[return-value]


def _has_triton(op: str) -> bool:
    # The Triton kernels land with issue #3; until then every op has only its torch reference.
    return False
