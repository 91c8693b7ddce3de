"""A projection of a few rows - the decode step's GEMMs - with the ops around it fused:
`y = residual + f(x) @ w^T`, f an RMSNorm of x, or silu(gate) * up of a stacked gate/up output.

At decode a projection multiplies [M = batch, K] by a weight it must read whole, so its time is
the weight's bytes; cuBLAS also pays ~6 us of ramp-up and drain per GEMM on an H200
(bench/gemm_shapes.py), and the norm, SiLU and residual around it are kernels of their own. The
Triton kernel (kernels/triton_gemm.py) reads each weight once at M <= SKINNY_MAX_M, fuses those
ops, and with programmatic dependent launch streams its weight while the kernel before it drains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import Backend, interpreting, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_rank, check_same_device

SKINNY_MAX_M = 64  # rows the kernel takes (one BLOCK_M tile); more go to cuBLAS
# (BLOCK_N, BLOCK_K, programs, num_warps, num_stages) on a GPU: K is split until the grid has
# about `programs` programs; a small one when interpreting on the CPU (split-K still exercised).
SKINNY_CONFIG = (64, 128, 264, 4, 3)
# The fastest of bench/skinny_gemm.py's sweep for clsa-4b's weights on an H200 at M = 7
# (bench/results/decode/skinny_gemm.json), keyed (N, K):
SKINNY_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (5120, 3072): (128, 128, 264, 8, 3),  # self q/k/v stacked: 11.6 us, 2.70 TB/s
    (3072, 3072): (64, 128, 264, 4, 3),  # output and cross query: 8.3-10.2 us
    (16384, 3072): (128, 128, 132, 8, 3),  # FFN gate/up stacked: 27.0 us, 3.73 TB/s
    (3072, 8192): (64, 128, 264, 8, 3),  # FFN down: 19.9 us, 2.53 TB/s
    (32000, 3072): (128, 256, 132, 4, 3),  # LM head: 49.5 us, 3.97 TB/s
}
SKINNY_CONFIG_INTERPRETED = (16, 32, 8, 1, 1)
MAX_COLUMN_BLOCKS = 1 << 14  # split-K counters kept per device (N / BLOCK_N at most)
PDL = True  # programmatic dependent launch on Hopper and later
# Each program asks L2 for its whole weight slice before its PDL wait. An experiment, off until
# bench/skinny_gemm.py (its "pdl+prefetch" column) and decode.py --skinny-prefetch show it helps.
PREFETCH_L2 = False


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None,
                            eps: float = 1e-6, silu: bool = False,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The spec, as the unfused model computes it: silu(gate) * up (x's two halves) when `silu`,
    then RMSNorm (fp32 statistics, x's dtype out) when `norm_weight`, then F.linear, then the
    residual added."""
    if silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_weight is not None:
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
    y = F.linear(x, w)
    return y if residual is None else residual + y


def skinny_linear(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                  silu: bool = False, residual: torch.Tensor | None = None, backend: Backend = "auto") -> torch.Tensor:
    """x: [M, K] ([M, 2K], gate then up, with `silu`); w: [N, K]; norm_weight: [K] or None;
    residual: [M, N] or None -> [M, N] in x's dtype. M <= SKINNY_MAX_M for the kernel.

    Raises ValueError for mismatched shapes or devices, TypeError for a dtype outside
    fp32/fp16/bf16 or x and w of different dtypes."""
    op = "skinny_linear"
    check_rank(op, "x", x, 2, "[M, K]")
    check_rank(op, "w", w, 2, "[N, K]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: w's dtype {w.dtype} must be x's {x.dtype}")
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if x.shape[1] != (2 * k if silu else k):
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [M, {'2K' if silu else 'K'}] for w {tuple(w.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"{op}: norm_weight {tuple(norm_weight.shape)} must be [K={k}]")
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} {residual.dtype} must be [M={m}, N={n}] {x.dtype}")
    extra = {name: t for name, t in (("norm_weight", norm_weight), ("residual", residual)) if t is not None}
    check_same_device(op, x=x, w=w, **extra)
    if resolve_backend(backend, x.device, op) == "torch":
        return skinny_linear_reference(x, w, norm_weight, eps, silu, residual)
    if m > SKINNY_MAX_M:
        raise ValueError(f"{op}: the Triton kernel takes M <= {SKINNY_MAX_M} rows, got {m}")
    from kernels.triton_gemm import launch_skinny_gemm

    x, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w))
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    block_n, block_k, split_k, num_warps, num_stages = launch_plan(n, k)
    column_blocks = -(-n // block_n)
    if column_blocks > MAX_COLUMN_BLOCKS:
        raise ValueError(f"{op}: N = {n} is over {MAX_COLUMN_BLOCKS * block_n} columns")
    block_m = max(16, 1 << (m - 1).bit_length())
    part = sq = counters = None
    if split_k > 1:
        part = torch.empty(split_k * block_m * n, device=x.device, dtype=torch.float32)
        sq = torch.empty(column_blocks * split_k * block_m, device=x.device, dtype=torch.float32)
        counters = _counters(x.device)
    launch_skinny_gemm(x, w, out, residual, norm_weight, eps, part, sq, counters, silu=silu, block_n=block_n,
                       block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                       pdl=_pdl(x.device), prefetch=PREFETCH_L2 and _pdl(x.device))
    return out


def launch_plan(n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, split_k, num_warps, num_stages) for a [N, K] weight: its configuration,
    K split until the grid has about the configuration's number of programs."""
    block_n, block_k, programs, num_warps, num_stages = (SKINNY_CONFIG_INTERPRETED if interpreting()
                                                         else SKINNY_CONFIGS.get((n, k), SKINNY_CONFIG))
    split_k = max(1, min(-(-k // block_k), -(-programs // -(-n // block_n))))
    return block_n, block_k, split_k, num_warps, num_stages


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """The split-K counters of `device`, zero between launches (each launch resets those it
    used). Shared by every launch on the device: launches on one stream run one after another
    (a PDL-launched one touches them only after its wait), so the engine's single stream is safe;
    kernels on two streams at once would race."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_COLUMN_BLOCKS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _pdl(device: torch.device) -> bool:
    return PDL and device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


@torch.library.custom_op("clsa::skinny_linear", mutates_args=())
def skinny_linear_op(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
                     residual: torch.Tensor | None) -> torch.Tensor:
    """`skinny_linear` through the Triton kernel as one opaque op, so that a `torch.compile`d
    layer calls it as it is instead of tracing into the launcher."""
    return skinny_linear(x, w, norm_weight, eps, silu, residual, backend="triton")


@skinny_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
      residual: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])
