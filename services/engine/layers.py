"""Building blocks of the model: RMSNorm, RoPE, SwiGLU, masked GQA attention, and the layers."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels.silu_mul import silu_mul_op
from kernels.skinny_linear import SKINNY_MAX_M, skinny_linear_op, skinny_qkv_op
from services.engine.config import ModelConfig

# Decode-sized projections (up to SKINNY_ROWS rows) on a GPU through kernels.skinny_linear, with
# their norm, SiLU and residual fused; off: cuBLAS and separate kernels (a benchmark's A/B switch).
# At 32 rows cuBLAS's GEMMs are faster than the kernel's (bench/results/decode/skinny_gemm.json).
SKINNY = True
SKINNY_ROWS = 16
# Larger projections' SwiGLU gate (silu(gate) * up of the stacked gate/up output) on a GPU through
# kernels.silu_mul's Triton pass, at the card's bandwidth; off: torch's ops (fused by inductor
# when the layer is compiled). The prefill's A/B switch (bench/prefill.py --no-silu-kernel).
SILU_KERNEL = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """One weight for several bias-free projections of the same input: their rows stacked, and
    each layer's weight made a view of its rows (no second copy; state_dict unchanged), so one
    GEMM reads them all - at decode batch sizes a GEMM's cost is reading its weight."""
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start:start + rows]
        start += rows
    return fused


def use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `project` takes the fused kernel: CUDA, fp16/bf16, at most SKINNY_ROWS rows, and no
    gradient wanted (the kernel has no backward: training keeps torch's ops)."""
    rows = x.numel() // x.shape[-1]
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (SKINNY and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and rows <= min(SKINNY_ROWS, SKINNY_MAX_M) and not wants_grad)


def use_silu_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `project`'s SwiGLU gate takes kernels.silu_mul: CUDA tensors, no gradient wanted (the
    kernel has no backward: training keeps torch's ops)."""
    return SILU_KERNEL and x.is_cuda and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def project(x: torch.Tensor, weight: torch.Tensor, norm: RMSNorm | None = None, silu: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + f(x) @ weight^T`: x [..., K] (with `silu`: [..., 2K], gate then up, f = silu(gate)
    * up), f = `norm` or the identity; weight [N, K]; residual [..., N] or None -> [..., N]. A few
    rows on a GPU (`use_skinny`): one kernel, nothing between the ops written out; else torch's ops."""
    if use_skinny(x, weight):
        lead = x.shape[:-1]
        res = None if residual is None else residual.reshape(-1, residual.shape[-1])
        out = skinny_linear_op(x.reshape(-1, x.shape[-1]), weight, None if norm is None else norm.weight,
                               norm.eps if norm is not None else 0.0, silu, res)
        return out.view(*lead, weight.shape[0])
    if silu and use_silu_kernel(x, weight):
        x = silu_mul_op(x)
    elif silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm is not None:
        x = norm(x)
    y = F.linear(x, weight)
    return y if residual is None else residual + y


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_up = nn.Linear(d_model, ffn_dim, bias=False)
        self.w_down = nn.Linear(ffn_dim, d_model, bias=False)
        self.fused: torch.Tensor | None = None  # gate and up stacked (fuse_linears), for inference

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + FFN(norm(x)) (each part optional)."""
        if self.fused is not None:
            return project(project(x, self.fused, norm), self.w_down.weight, silu=True, residual=residual)
        h = x if norm is None else norm(x)
        return project(F.silu(self.w_gate(h)) * self.w_up(h), self.w_down.weight, residual=residual)


class Rope(NamedTuple):
    """RoPE's cos and sin for a batch of positions, [B, C, 1, d / 2] fp32 each: computed once per
    step and shared by every layer (a compiled layer then only rotates)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """RoPE's frequencies [head_dim / 2], fp32 (what `rope_angles` multiplies the positions by)."""
    half = head_dim // 2
    return 1.0 / (theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                inv_freq: torch.Tensor | None = None) -> Rope:
    """The rotation of `positions [B, C]` (negative, padding, positions as 0; callers mask them).
    `inv_freq`: `rope_inv_freq`'s, computed once by a caller of many steps (four kernels fewer)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    angles = positions.clamp(min=0).float()[..., None] * inv_freq  # [B, C, half]
    return Rope(angles.cos()[:, :, None, :], angles.sin()[:, :, None, :])


def apply_rope(x: torch.Tensor, positions: torch.Tensor | Rope, theta: float) -> torch.Tensor:
    """Rotate `x [B, C, H, d]` by its token positions `[B, C]`, or by their `Rope` (rotate-half
    convention). Negative (padding) positions are rotated as position 0; callers mask them."""
    rope = positions if isinstance(positions, Rope) else rope_angles(positions, x.shape[-1], theta)
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * rope.cos - x2 * rope.sin, x2 * rope.cos + x1 * rope.sin], dim=-1).to(x.dtype)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     sm_scale: float) -> torch.Tensor:
    """GQA attention with an explicit boolean mask.

    q: [B, C, Hq, d]; k, v: [B, S, Hkv, d]; mask: [B, C, S] (True = attend). Query rows with no
    True entry (padding) attend everywhere rather than produce NaN; callers ignore them.
    Returns [B, C, Hq, d].
    """
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=sm_scale, enable_gqa=True,
    )
    return out.transpose(1, 2)


def _expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """[B, T, Hkv, d] -> [B, T, Hq, d], each KV head repeated for its query heads: SDPA's flash
    and memory-efficient kernels then apply (with `enable_gqa` a mask or a long sequence can fall
    back to the math kernel, which materializes every score)."""
    return x if x.shape[2] == n_q_heads else x.repeat_interleave(n_q_heads // x.shape[2], dim=2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Causal GQA attention over a whole sequence (SDPA's flash path where there is one).
    q: [B, T, Hq, d]; k, v: [B, T, Hkv, d] -> [B, T, Hq, d]. Rows padded at the end of a sequence
    change nothing before them."""
    hq = q.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), _expand_kv(k, hq).transpose(1, 2),
                                         _expand_kv(v, hq).transpose(1, 2), is_causal=True, scale=sm_scale)
    return out.transpose(1, 2)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             sm_scale: float) -> torch.Tensor:
    """Causal attention to the last `window` positions (query included), in O(T x window): the
    sequence is cut into blocks of `window` queries, each attending to its own block and the one
    before. Same result as `masked_attention` with the sliding-window mask.
    q: [B, T, Hq, d]; k, v: [B, T, Hkv, d] -> [B, T, Hq, d]."""
    b, t, hq, d = q.shape
    w = min(window, t)
    nb = -(-t // w)
    pad = nb * w - t

    def blocks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, nb, w, x.shape[2], d)

    qb, kb, vb = blocks(q), blocks(_expand_kv(k, hq)), blocks(_expand_kv(v, hq))
    # keys of block i: block i - 1 (zeros before the first) then block i
    kk = torch.cat([F.pad(kb, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], kb], dim=2)
    vv = torch.cat([F.pad(vb, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], vb], dim=2)
    i = torch.arange(w, device=q.device)[:, None]  # query within its block
    j = torch.arange(2 * w, device=q.device)[None, :]  # key within [previous block, this block]
    diff = w + i - j  # query position - key position
    mask = ((diff >= 0) & (diff < window)).expand(nb, w, 2 * w).clone()
    mask[0, :, :w] = False  # there is no block before the first
    out = F.scaled_dot_product_attention(
        qb.reshape(b * nb, w, hq, d).transpose(1, 2), kk.reshape(b * nb, 2 * w, hq, d).transpose(1, 2),
        vv.reshape(b * nb, 2 * w, hq, d).transpose(1, 2),
        attn_mask=mask.expand(b, nb, w, 2 * w).reshape(b * nb, 1, w, 2 * w), scale=sm_scale,
    )
    return out.transpose(1, 2).reshape(b, nb * w, hq, d)[:, :t]


class _Block(nn.Module):
    """Pre-norm residual block: attention (its inputs defined by the subclass), then SwiGLU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection of the attention result `[B, C, Hq, d]`, then the FFN."""
        x = project(attn.flatten(-2), self.wo.weight, residual=x)
        return self.ffn(x, self.ffn_norm, residual=x)


class AttentionLayer(_Block):
    """A layer with its own K/V: the YOCO self layers (sliding window) and every layer of the
    transformer baseline (global). Both use RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.fused: torch.Tensor | None = None  # wq, wk, wv stacked (fuse_linears), for inference

    def qkv(self, x: torch.Tensor, positions: torch.Tensor | Rope, rotate_q: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, C, D], positions: [B, C] (or their Rope) -> roped q [B, C, Hq, d], roped k and v
        [B, C, Hkv, d]. `rotate_q=False`: q as projected (for an attention kernel that rotates it)."""
        b, c, _ = x.shape
        cfg = self.cfg
        if self.fused is not None:
            q, k, v = project(x, self.fused, self.attn_norm).split(
                [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim], dim=-1)
        else:
            h = self.attn_norm(x)
            q, k, v = self.wq(h), self.wk(h), self.wv(h)
        q = q.reshape(b, c, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, c, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, c, cfg.n_kv_heads, cfg.head_dim)
        theta = self.cfg.rope_theta
        return apply_rope(q, positions, theta) if rotate_q else q, apply_rope(k, positions, theta), v

    def qkv_into_rings(self, x: torch.Tensor, rope: Rope, ring_k: torch.Tensor, ring_v: torch.Tensor,
                       slots: torch.Tensor, ring_rows: torch.Tensor) -> torch.Tensor:
        """Decode's `qkv` for one token a sequence (x [B, 1, D]) in one kernel (`kernels.skinny_qkv`:
        stacked projections and `use_skinny` needed): k and v go straight to row ring_rows[b] of
        slot slots[b] of the layer's rings [S, W, Hkv, d]; returns the roped q [B, 1, Hq, d]."""
        cfg = self.cfg
        b = x.shape[0]
        assert self.fused is not None
        out = skinny_qkv_op(x.reshape(b, -1), self.fused, self.attn_norm.weight, self.attn_norm.eps,
                            rope.cos.reshape(b, -1).contiguous(), rope.sin.reshape(b, -1).contiguous(), cfg.n_heads,
                            cfg.n_kv_heads, ring_k, ring_v, slots, ring_rows)
        return out[:, : cfg.n_heads * cfg.head_dim].view(b, 1, cfg.n_heads, cfg.head_dim)


class SharedKV(nn.Module):
    """The YOCO boundary: from the self-decoder's output, the one K/V every cross layer reads and
    the CLSA indexer's key and query (single head, no positional encoding)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kv_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wk_idx = nn.Linear(cfg.d_model, cfg.index_dim, bias=False)
        self.wq_idx = nn.Linear(cfg.d_model, cfg.index_dim, bias=False)
        self.fused: torch.Tensor | None = None  # wk, wv, wk_idx, wq_idx stacked (fuse_linears), for inference

    def forward(self, x: torch.Tensor, positions: torch.Tensor | Rope) -> tuple[torch.Tensor, ...]:
        """x: [B, C, D], positions [B, C] (or their Rope) -> k, v [B, C, Hkv, d], k_idx, q_idx [B, C, d_idx]."""
        b, c, _ = x.shape
        cfg = self.cfg
        kv = cfg.n_kv_heads * cfg.head_dim
        if self.fused is not None:
            k, v, k_idx, q_idx = project(x, self.fused, self.kv_norm).split([kv, kv, cfg.index_dim, cfg.index_dim],
                                                                            dim=-1)
        else:
            h = self.kv_norm(x)
            k, v, k_idx, q_idx = self.wk(h), self.wv(h), self.wk_idx(h), self.wq_idx(h)
        k = k.reshape(b, c, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, c, cfg.n_kv_heads, cfg.head_dim)
        if cfg.cross_rope:
            k = apply_rope(k, positions, cfg.rope_theta)
        return k, v, k_idx, q_idx


class CrossLayer(_Block):
    """A cross-decoder layer: its own queries over the shared K/V, then the FFN."""

    def query(self, x: torch.Tensor, positions: torch.Tensor | Rope) -> torch.Tensor:
        """x: [B, C, D], positions [B, C] (or their Rope) -> q [B, C, Hq, d]."""
        b, c, _ = x.shape
        q = project(x, self.wq.weight, self.attn_norm).view(b, c, self.cfg.n_heads, self.cfg.head_dim)
        if self.cfg.cross_rope:
            q = apply_rope(q, positions, self.cfg.rope_theta)
        return q
