"""A decode step's whole SwiGLU FFN in one kernel: `out = residual + w_down @ (silu(g) * u)` with
`[g | u] = rmsnorm(x) @ w_gate_up^T`, for a few rows.

Through `kernels.skinny_linear` the FFN is two launches - the stacked gate/up GEMM with the norm
fused, then the down GEMM with the gate and the residual fused - and the down GEMM cannot start
its weight's stream until the last gate/up program has finished (PDL only lets it load its first
tiles). Here one launch holds both: programs take tiles from a counter in the order they start,
the gate/up tiles first, and a down tile waits only for the gate/up tiles of its own slice of
the hidden dimension, so the down weight streams while the gate/up weight's last tiles drain.
Shapes the kernel does not take (more than SKINNY_MAX_M rows, a hidden size its slices do not
divide) go through the two launches.
"""

from __future__ import annotations

import torch

from kernels._backend import Backend, interpreting, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_rank, check_same_device
from kernels.skinny_linear import SKINNY_MAX_M, _pdl, skinny_linear, skinny_linear_reference

# (BLOCK_F, BLOCK_K, BLOCK_N, K_SLICE, num_warps, num_stages) on a GPU: gate/up tiles of BLOCK_F
# columns of g and of u; down tiles of BLOCK_N output columns by K_SLICE of the hidden dimension
# (halved until it divides it); BLOCK_K the K step of both. A small one when interpreting.
FFN_CONFIG = (32, 128, 64, 1024, 4, 3)
FFN_CONFIG_INTERPRETED = (16, 32, 16, 64, 1, 1)
# Weight tiles each program loads before its PDL wait (1 or 2; a gate/up tile loads one of g and
# one of u per step).
FFN_PRE_WAIT_TILES = 2
# K slice of the output projection in `skinny_finish` (a multiple of BLOCK_K; Q = 3072 in 3).
FFN_O_SLICE = 1024
FFN_O_SLICE_INTERPRETED = 64
_MAX_COUNTERS = 1024  # the kernel zeroes its counters 1024 at a time


def skinny_ffn_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         norm_weight: torch.Tensor, eps: float, residual: torch.Tensor) -> torch.Tensor:
    """The spec, as the two-launch path computes it: the stacked gate/up projection of rmsnorm(x)
    (rounded to x's dtype), then the down projection of silu(gate) * up, plus the residual."""
    gate_up = skinny_linear_reference(x, w_gate_up, norm_weight, eps)
    return skinny_linear_reference(gate_up, w_down, silu=True, residual=residual)


def skinny_ffn(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
               eps: float, residual: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """x, residual: [M, D]; w_gate_up: [2F, D] (gate rows, then up rows); w_down: [D, F];
    norm_weight: [D] -> [M, D] in x's dtype. M <= SKINNY_MAX_M for the kernel.

    Raises ValueError for mismatched shapes or devices, TypeError for a dtype outside
    fp32/fp16/bf16 or weights of another dtype than x's."""
    op = "skinny_ffn"
    _check_ffn(op, x, w_gate_up, w_down, norm_weight, residual)
    if resolve_backend(backend, x.device, op) == "torch":
        return skinny_ffn_reference(x, w_gate_up, w_down, norm_weight, eps, residual)
    plan = launch_plan(x.shape[0], x.shape[1], w_down.shape[1])
    if plan is None:  # the two launches
        gate_up = skinny_linear(x, w_gate_up, norm_weight, eps, backend="triton")
        return skinny_linear(gate_up, w_down, silu=True, residual=residual, backend="triton")
    return _launch(x, w_gate_up, w_down, norm_weight, eps, residual, plan)


def skinny_finish_reference(a: torch.Tensor, w_o: torch.Tensor, layer_in: torch.Tensor, w_gate_up: torch.Tensor,
                            w_down: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The spec of a layer's `finish`: x = layer_in + a @ w_o^T (rounded to a's dtype), then x + FFN(x)."""
    x = skinny_linear_reference(a, w_o, residual=layer_in)
    return skinny_ffn_reference(x, w_gate_up, w_down, norm_weight, eps, x)


def skinny_finish(a: torch.Tensor, w_o: torch.Tensor, layer_in: torch.Tensor, w_gate_up: torch.Tensor,
                  w_down: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  backend: Backend = "auto") -> torch.Tensor:
    """A decoder layer's end in one kernel: the attention's output projection with its residual,
    x = layer_in + a @ w_o^T, then `skinny_ffn(x, ..., residual=x)`; the FFN's gate/up tiles wait in
    the kernel for the last column of x. a: [M, Q]; w_o: [D, Q]; layer_in: [M, D]; the FFN's
    weights as `skinny_ffn`'s -> [M, D] in a's dtype.

    Raises ValueError for mismatched shapes or devices, TypeError for bad dtypes."""
    op = "skinny_finish"
    check_rank(op, "a", a, 2, "[M, Q]")
    check_rank(op, "w_o", w_o, 2, "[D, Q]")
    _check_ffn(op, layer_in, w_gate_up, w_down, norm_weight, layer_in)
    if a.dtype != layer_in.dtype or w_o.dtype != layer_in.dtype:
        raise TypeError(f"{op}: a {a.dtype} and w_o {w_o.dtype} must have layer_in's dtype {layer_in.dtype}")
    if tuple(w_o.shape) != (layer_in.shape[1], a.shape[1]) or a.shape[0] != layer_in.shape[0]:
        raise ValueError(f"{op}: a {tuple(a.shape)} and w_o {tuple(w_o.shape)} must be [M, Q] and [D, Q] for "
                         f"layer_in {tuple(layer_in.shape)}")
    check_same_device(op, a=a, w_o=w_o, layer_in=layer_in)
    if resolve_backend(backend, a.device, op) == "torch":
        return skinny_finish_reference(a, w_o, layer_in, w_gate_up, w_down, norm_weight, eps)
    plan = launch_plan(a.shape[0], layer_in.shape[1], w_down.shape[1])
    if plan is None:
        x = skinny_linear(a, w_o, residual=layer_in, backend="triton")
        return skinny_ffn(x, w_gate_up, w_down, norm_weight, eps, x, backend="triton")
    return _launch(layer_in, w_gate_up, w_down, norm_weight, eps, layer_in, plan, (a, w_o))


def _check_ffn(op: str, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
               residual: torch.Tensor) -> None:
    check_rank(op, "x", x, 2, "[M, D]")
    check_rank(op, "w_gate_up", w_gate_up, 2, "[2F, D]")
    check_rank(op, "w_down", w_down, 2, "[D, F]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down), ("residual", residual)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name}'s dtype {t.dtype} must be x's {x.dtype}")
    m, d, f = x.shape[0], x.shape[1], w_down.shape[1]
    if tuple(w_gate_up.shape) != (2 * f, d) or w_down.shape[0] != d:
        raise ValueError(f"{op}: w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} must be "
                         f"[2F, D] and [D, F] for x {tuple(x.shape)}")
    if tuple(norm_weight.shape) != (d,):
        raise ValueError(f"{op}: norm_weight {tuple(norm_weight.shape)} must be [D={d}]")
    if tuple(residual.shape) != (m, d):
        raise ValueError(f"{op}: residual {tuple(residual.shape)} must be [M={m}, D={d}]")
    check_same_device(op, x=x, w_gate_up=w_gate_up, w_down=w_down, norm_weight=norm_weight, residual=residual)


def launch_plan(m: int, d: int, f: int) -> tuple[int, int, int, int, int, int] | None:
    """(BLOCK_F, BLOCK_K, BLOCK_N, K_SLICE, num_warps, num_stages) for M rows of a [D] -> [F] -> [D]
    FFN, or None where the kernel does not take it: over SKINNY_MAX_M rows, or no K_SLICE (the
    configuration's, halved) that divides F, is a multiple of BLOCK_F and BLOCK_K and holds the
    tiles loaded before the wait."""
    block_f, block_k, block_n, k_slice, num_warps, num_stages = (FFN_CONFIG_INTERPRETED if interpreting()
                                                                 else FFN_CONFIG)
    if m > SKINNY_MAX_M or m == 0:
        return None
    while k_slice > 1 and f % k_slice:
        k_slice //= 2
    if k_slice % block_f or k_slice % block_k or k_slice < FFN_PRE_WAIT_TILES * block_k:
        return None
    if 3 + f // k_slice + 2 * -(-d // block_n) > _MAX_COUNTERS:
        return None
    return block_f, block_k, block_n, k_slice, num_warps, num_stages


def _launch(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor, eps: float,
            residual: torch.Tensor, plan: tuple[int, int, int, int, int, int],
            attn_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The kernel's launch. With `attn_out` (a, w_o): x and residual are the layer's input, and the
    FFN's input is x + a @ w_o^T, made in the kernel (into a workspace)."""
    from kernels.triton_gemm import launch_skinny_ffn

    if FFN_PRE_WAIT_TILES not in (1, 2):
        raise ValueError(f"skinny_ffn: FFN_PRE_WAIT_TILES must be 1 or 2, got {FFN_PRE_WAIT_TILES}")
    x, w_gate_up, w_down, residual = (t if t.stride(-1) == 1 else t.contiguous()
                                      for t in (x, w_gate_up, w_down, residual))
    block_f, block_k, block_n, k_slice, num_warps, num_stages = plan
    m, d, f = x.shape[0], x.shape[1], w_down.shape[1]
    block_m = max(16, 1 << (m - 1).bit_length())
    out = torch.empty(m, d, device=x.device, dtype=x.dtype)
    h = torch.empty(block_m, f, device=x.device, dtype=x.dtype)
    part = torch.empty(f // k_slice * block_m * d, device=x.device, dtype=torch.float32)
    key: tuple = plan
    o_args = None
    if attn_out is not None:
        a, w_o = (t if t.stride(-1) == 1 else t.contiguous() for t in attn_out)
        # K slices of the output projection: FFN_O_SLICE, at least the tiles loaded before the wait
        k_slice_o = max(FFN_O_SLICE_INTERPRETED if interpreting() else FFN_O_SLICE,
                        FFN_PRE_WAIT_TILES * block_k) // block_k * block_k
        part_o = torch.empty(-(-a.shape[1] // k_slice_o) * block_m * d, device=x.device, dtype=torch.float32)
        o_args = (a, w_o, x, part_o, k_slice_o)
        x = residual = torch.empty(m, d, device=x.device, dtype=x.dtype)  # the FFN's input, made in the kernel
        key = (*plan, "finish", k_slice_o, a.shape[1])
    launch_skinny_ffn(x, w_gate_up, w_down, norm_weight, eps, residual, out, h, part, counters(w_down, key),
                      block_f=block_f, block_k=block_k, block_n=block_n, k_slice=k_slice, num_warps=num_warps,
                      num_stages=num_stages, pdl=_pdl(x.device), pre_wait_tiles=FFN_PRE_WAIT_TILES,
                      attn_out=o_args)
    return out


_COUNTERS: dict[tuple, torch.Tensor] = {}


def counters(w_down: torch.Tensor, plan: tuple) -> torch.Tensor:
    """The counters of one FFN (its down weight) under one launch plan (`launch_plan`'s, and for
    `skinny_finish` its output projection's slices). Each FFN has its own: the kernel takes its
    first tile before its PDL wait, which is safe against its own previous launch with the same
    tile count (see the kernel) but not against another FFN's launch still running."""
    key = (w_down.device, w_down.data_ptr(), tuple(w_down.shape), plan)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(_MAX_COUNTERS + 1, dtype=torch.int32, device=w_down.device)
    return _COUNTERS[key]


@torch.library.custom_op("clsa::skinny_finish", mutates_args=())
def skinny_finish_op(a: torch.Tensor, w_o: torch.Tensor, layer_in: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`skinny_finish` through the Triton kernel as one opaque op."""
    return skinny_finish(a, w_o, layer_in, w_gate_up, w_down, norm_weight, eps, backend="triton")


@skinny_finish_op.register_fake
def _(a: torch.Tensor, w_o: torch.Tensor, layer_in: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
      norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    return layer_in.new_empty(layer_in.shape)


@torch.library.custom_op("clsa::skinny_ffn", mutates_args=())
def skinny_ffn_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor,
                  eps: float, residual: torch.Tensor) -> torch.Tensor:
    """`skinny_ffn` through the Triton kernel as one opaque op (a compiled layer calls it as is)."""
    return skinny_ffn(x, w_gate_up, w_down, norm_weight, eps, residual, backend="triton")


@skinny_ffn_op.register_fake
def _(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm_weight: torch.Tensor, eps: float,
      residual: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1])
