"""Prefill attention over a sliding window: each query attends to the last `window` positions of
its own sequence (itself included), causal, GQA heads. The self-decoder's attention for a prompt's
first chunk, where the window lies inside the chunk.

`window_attention` reads q, k, v where the projections left them (strided views, K/V heads not
repeated) and touches only the key blocks a query block's window covers: O(T x W), no mask, no
copies. fp32 accumulation; the query's dtype out.
"""

from __future__ import annotations

import torch

from kernels._backend import Backend, interpreting, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_rank, check_same_device

# (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU, the fastest of bench/window_attention.py's on
# an H200 (clsa-4b shapes, T = 128K: 2.8 ms a layer, 293 TFLOP/s, 5.0x SDPA in blocks;
# bench/results/window_attention.json); a small one when interpreting on the CPU.
WINDOW_CONFIG = (64, 64, 4, 3)
WINDOW_CONFIG_INTERPRETED = (16, 16, 1, 1)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                               sm_scale: float) -> torch.Tensor:
    """The spec, in fp32 with an explicit [T, T] mask (small T only)."""
    t, hq = q.shape[1], q.shape[2]
    pos = torch.arange(t, device=q.device)
    diff = pos[:, None] - pos[None, :]
    visible = (diff >= 0) & (diff < window)
    group = hq // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * sm_scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sm_scale: float,
                     backend: Backend = "auto") -> torch.Tensor:
    """q: [B, T, Hq, d]; k, v: [B, T, Hkv, d] (Hq a multiple of Hkv; d a power of two >= 16) ->
    [B, T, Hq, d]: query t over keys max(0, t - window + 1) .. t. Rows padded at the end of a
    sequence change nothing before them."""
    op = "window_attention"
    check_rank(op, "q", q, 4, "[B, T, Hq, d]")
    check_rank(op, "k", k, 4, "[B, T, Hkv, d]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(op, name, x, FLOAT_DTYPES)
    if v.shape != k.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must match "
                         f"each other and q's dtype {q.dtype}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"{op}: k {tuple(k.shape)} must be [B={b}, T={t}, Hkv, d={d}]")
    if hq % k.shape[2] != 0:
        raise ValueError(f"{op}: Hq ({hq}) must be a multiple of Hkv ({k.shape[2]})")
    if window < 1:
        raise ValueError(f"{op}: window must be >= 1, got {window}")
    check_same_device(op, q=q, k=k, v=v)
    if resolve_backend(backend, q.device, op) == "torch":
        return window_attention_reference(q, k, v, window, sm_scale)
    if d < 16 or d & (d - 1):
        raise ValueError(f"{op}: the Triton kernel needs head_dim a power of two >= 16, got {d}")
    from kernels.triton_attention import launch_window_attention

    q, k, v = (y if y.stride(-1) == 1 else y.contiguous() for y in (q, k, v))
    out = torch.empty(b, t, hq, d, device=q.device, dtype=q.dtype)
    if b * t == 0:
        return out
    block_m, block_n, num_warps, num_stages = WINDOW_CONFIG_INTERPRETED if interpreting() else WINDOW_CONFIG
    launch_window_attention(q, k, v, out, window, sm_scale, block_m=block_m, block_n=block_n,
                            num_warps=num_warps, num_stages=num_stages)
    return out
