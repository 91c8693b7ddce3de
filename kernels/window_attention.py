"""Prefill attention over a sliding window: each query attends to the last `window` positions of
its own sequence (itself included), causal, GQA heads. The self-decoder's attention for a prompt
chunk: the first one (the window inside the chunk), or a later one behind `q_offset` keys of the
tokens before it (the ring buffer, in position order).

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
# The grid's fastest axis: the query head (True: the programs of one query block run together and
# share its RoPE angles and K/V tiles in L2) or the query block (False: faster on the H200 at
# 128K, 2.615 against 2.734 ms a layer; bench/results/window_attention_rope.json).
WINDOW_HEADS_FIRST = False


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half) of x [B, T, H, d] by cos, sin [B, T, d / 2] in fp32, in x's dtype."""
    half = x.shape[-1] // 2
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                               sm_scale: float, q_offset: int = 0, key_start: int = 0,
                               q_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The spec, in fp32 with an explicit [Tq, Tk] mask (small T only). A query row that sees no
    key (none can: its own key is always visible) would be zeros."""
    if q_rope is not None:
        q = rotate_half(q, *q_rope)
    tq, tk, hq = q.shape[1], k.shape[1], q.shape[2]
    diff = (torch.arange(tq, device=q.device) + q_offset)[:, None] - torch.arange(tk, device=q.device)[None, :]
    visible = (diff >= 0) & (diff < window) & (torch.arange(tk, device=q.device) >= key_start)[None, :]
    group = hq // k.shape[2]
    kf = k.float().repeat_interleave(group, dim=2)
    vf = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), kf) * sm_scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", probs, vf).to(q.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sm_scale: float,
                     q_offset: int = 0, key_start: int = 0, backend: Backend = "auto",
                     q_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q: [B, Tq, Hq, d]; k, v: [B, Tq + q_offset, Hkv, d] (Hq a multiple of Hkv; d a power of two
    >= 16 for the kernel) -> [B, Tq, Hq, d]. Query t is key t + q_offset and attends to keys
    max(key_start, t + q_offset - window + 1) .. t + q_offset: a first chunk with q_offset 0, a
    later one behind the W tokens before it (key_start > 0 while fewer than W came before). Rows
    padded at the end of a sequence change nothing before them. `q_rope`: (cos, sin) [B, Tq, d / 2]
    (or [B, Tq, 1, d / 2]) - q comes unrotated and the kernel rotates it (RoPE, rotate-half) as it
    loads it: no pass over q for it."""
    op = "window_attention"
    check_rank(op, "q", q, 4, "[B, Tq, Hq, d]")
    check_rank(op, "k", k, 4, "[B, Tk, Hkv, d]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(op, name, x, FLOAT_DTYPES)
    if v.shape != k.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must match "
                         f"each other and q's dtype {q.dtype}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t + q_offset or k.shape[3] != d:
        raise ValueError(f"{op}: k {tuple(k.shape)} must be [B={b}, Tq + q_offset={t + q_offset}, Hkv, d={d}]")
    if hq % k.shape[2] != 0:
        raise ValueError(f"{op}: Hq ({hq}) must be a multiple of Hkv ({k.shape[2]})")
    if window < 1:
        raise ValueError(f"{op}: window must be >= 1, got {window}")
    if q_offset < 0 or not 0 <= key_start <= q_offset:
        raise ValueError(f"{op}: need 0 <= key_start <= q_offset, got key_start {key_start}, q_offset {q_offset}")
    check_same_device(op, q=q, k=k, v=v)
    if q_rope is not None:
        q_rope = _check_rope(op, q_rope, q)
    if resolve_backend(backend, q.device, op) == "torch":
        return window_attention_reference(q, k, v, window, sm_scale, q_offset, key_start, q_rope)
    if d < 16 or d & (d - 1):
        raise ValueError(f"{op}: the Triton kernel needs head_dim a power of two >= 16, got {d}")
    from kernels.triton_attention import launch_window_attention

    q, k, v = (y if y.stride(-1) == 1 else y.contiguous() for y in (q, k, v))
    out = torch.empty(b, t, hq, d, device=q.device, dtype=q.dtype)
    if b * t == 0:
        return out
    block_m, block_n, num_warps, num_stages = WINDOW_CONFIG_INTERPRETED if interpreting() else WINDOW_CONFIG
    launch_window_attention(q, k, v, out, window, sm_scale, q_offset, key_start, block_m=block_m,
                            block_n=block_n, num_warps=num_warps, num_stages=num_stages, rope=q_rope,
                            heads_first=WINDOW_HEADS_FIRST)
    return out


def _check_rope(op: str, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) as fp32 [B, Tq, d / 2] with one set of strides and the last dimension contiguous."""
    b, t, _, d = q.shape
    cos, sin = (r.squeeze(2) if r.dim() == 4 and r.shape[2] == 1 else r for r in rope)
    for name, given, r in (("cos", rope[0], cos), ("sin", rope[1], sin)):
        if r.shape != (b, t, d // 2):
            raise ValueError(f"{op}: q_rope's {name} {tuple(given.shape)} must be [B={b}, Tq={t}, d/2={d // 2}] "
                             "(or [B, Tq, 1, d/2])")
        if r.dtype != torch.float32:
            raise TypeError(f"{op}: q_rope's {name} must be float32, got {r.dtype}")
    check_same_device(op, q=q, cos=cos, sin=sin)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin
