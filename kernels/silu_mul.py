"""The SwiGLU gate of a stacked gate/up projection's output: `silu(gate) * up`, x = [gate | up].

At prefill the stacked gate/up GEMM writes [M, 2F] (at 128K tokens and F = 8192, 4 GiB a layer)
and the down projection reads [M, F], so this pass moves 1.5x the intermediate's bytes and nothing
else; the Triton kernel (kernels/triton_pointwise.py) reads each row's gate and up halves once,
in fp32, and writes the product in x's dtype - a pass at the card's bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import Backend, interpreting, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_same_device

# (BLOCK_M rows, BLOCK_F columns, num_warps) of one program; a small tile when interpreting.
# The fastest of bench/silu_mul.py's sweep on the H200 at 128K x 8192 (1.56 ms, 4.12 TB/s; inductor's
# fused kernel 1.65 ms, 3.91 TB/s; bench/results/decode/silu_mul.json).
SILU_MUL_CONFIG = (4, 2048, 8)
SILU_MUL_CONFIG_INTERPRETED = (2, 32, 1)


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """The spec: x [..., 2F] -> silu(x[..., :F]) * x[..., F:], in fp32, x's dtype out."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_mul(x: torch.Tensor, backend: Backend = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., 2F] (its rows copied contiguous first if they are not) -> [..., F] (written into `out`
    when given)."""
    op = "silu_mul"
    check_dtype(op, "x", x, FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"{op}: x's last dimension must be even (gate then up), got {tuple(x.shape)}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is not None:
        check_same_device(op, x=x, out=out)
        if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"{op}: out must be contiguous {shape} {x.dtype}")
    if resolve_backend(backend, x.device, op) == "torch":
        y = silu_mul_reference(x)
        return y if out is None else out.copy_(y)
    from kernels.triton_pointwise import launch_silu_mul

    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if x2.shape[0] and shape[-1]:
        block_m, block_f, warps = SILU_MUL_CONFIG_INTERPRETED if interpreting() else SILU_MUL_CONFIG
        launch_silu_mul(x2, y.view(-1, shape[-1]), block_m=block_m, block_f=block_f, num_warps=warps)
    return y


@torch.library.custom_op("clsa::silu_mul", mutates_args=())
def silu_mul_op(x: torch.Tensor) -> torch.Tensor:
    """`silu_mul` through the Triton kernel as one opaque op (a compiled layer calls it as it is)."""
    return silu_mul(x, backend="triton")


@silu_mul_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
