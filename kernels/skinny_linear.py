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

from kernels._backend import Backend, cuda_capability, interpreting, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_rank, check_same_device

SKINNY_MAX_M = 64  # rows the kernel takes (one BLOCK_M tile); more go to cuBLAS
# (BLOCK_N, BLOCK_K, programs, num_warps, num_stages) on a GPU: K is split until the grid has
# about `programs` programs; a small one when interpreting on the CPU (split-K still exercised).
SKINNY_CONFIG = (64, 128, 264, 4, 3)
# The fastest of bench/skinny_gemm.py's sweep for clsa-4b's weights on an H200 at M = 7
# (bench/results/decode/skinny_gemm.json), keyed (N, K):
SKINNY_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (5120, 3072): (128, 128, 264, 8, 3),  # self q/k/v stacked: 11.6 us, 2.70 TB/s
    # the output projection (+ residual, 32 a step): 8.3 us; the cross query (norm, 16 a step)
    # was fastest at 528 programs (9.6 us; 10.2 at 264, over 10.8 at 132)
    (3072, 3072): (64, 128, 132, 4, 3),
    (16384, 3072): (128, 128, 132, 8, 3),  # FFN gate/up stacked: 27.0 us, 3.73 TB/s
    # FFN down: 19.9 us, 2.53 TB/s alone with 8 warps; 4 warps make the 128K step 2.2% faster at B = 1
    # and leave B = 7 as it was (H200 and H100, bench/results/decode/decode_ab_stages_warps_h200.json,
    # decode_ab_down_w4_h100.json)
    (3072, 8192): (64, 128, 264, 4, 3),
    (32000, 3072): (128, 256, 132, 4, 3),  # LM head: 49.5 us, 3.97 TB/s
}
SKINNY_CONFIG_INTERPRETED = (16, 32, 8, 1, 1)
MAX_COLUMN_BLOCKS = 1 << 14  # split-K counters kept per device (N / BLOCK_N at most)
PDL = True  # programmatic dependent launch on Hopper and later
# Each program asks L2 for its whole weight slice before its PDL wait. An experiment, off until
# bench/skinny_gemm.py (its "pdl+prefetch" column) and decode.py --skinny-prefetch show it helps.
PREFETCH_L2 = False
# Weight tiles each program loads into registers before its PDL wait (1 to 3; the first tile's
# load before the wait is what lets a GEMM stream while the kernel ahead drains). 3 on the H200
# (bench/decode_ab.py, bench/results/decode/decode_ab_switches.json: the 128K step at B = 1 / 7
# 2.378 / 2.842 ms with 1 tile, 2.353 / 2.808 with 2, 2.310 / 2.770 with 3).
# 4 tiles do not fit: the 128 x 128, 3-stage configurations then ask for 264 KiB of shared memory
# (232 KiB on Hopper), so the launch fails (tried on an H100, 2026-12-06).
PRE_WAIT_TILES = 3
# The L2 eviction policy of the weight loads: "evict_first" lets a weight that is read once per
# step stream past what the next kernels read again (the shared KV cache's selected rows). An
# experiment, "" (the default policy): in the same A/B, "evict_first" here with the sparse K/V
# "evict_last" changed the step by under 0.5% (noise).
WEIGHT_EVICTION = ""
EVICTION_POLICIES = ("", "evict_first", "evict_last")
# What a program does right after its PDL wait (`triton_gemm._slice_dot`'s ORDER). "in_turn": each
# early tile's x tile is loaded and its dot done before the next x load, then the pipelined loop -
# whose first weight loads (to HBM) are thus issued only after three dependent round trips to L2
# for x (the SASS: LDGSTS after the third HGMMA). "x_together": the early tiles' x tiles loaded at
# once (one round trip), then their dots, then the loop.
POST_WAIT_ORDERS = {"in_turn": 0, "x_together": 1}
# Weight tiles past the early ones (the pipelined loop's first) that each program asks L2 for right
# after its PDL wait, before x's loads (PTX prefetch.global.L2; 0 = none): HBM is idle then, the
# kernel ahead done and this kernel's early tiles in.
# "x_together" with 1 tile prefetched is the default: on an H100, the 128K step at B = 7 took 0.7%,
# 0.7% and 1.0% less than "in_turn" without it in three calls (bench/decode_ab.py, 2-3 rounds each:
# bench/results/decode/decode_ab_post_wait_h100.json, decode_ab_post_wait_tiles_h100.json,
# decode_ab_post_wait_programs_h100.json); "x_together" alone 0.6% and 0.3%, 2 tiles prefetched
# +0.6% (slower), 2 tiles without "x_together" +1.1%.
POST_WAIT_ORDER = "x_together"
POST_WAIT_PREFETCH = 1


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
    return _launch(op, x, w, norm_weight, eps, silu, residual)


def _launch(op: str, x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
            residual: torch.Tensor | None, block_n: int | None = None, rope: tuple | None = None,
            ring: tuple | None = None) -> torch.Tensor:
    """The kernel's launch: workspaces, configuration (`block_n` overriding its BLOCK_N)."""
    from kernels.triton_gemm import launch_skinny_gemm

    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if m > SKINNY_MAX_M:
        raise ValueError(f"{op}: the Triton kernel takes M <= {SKINNY_MAX_M} rows, got {m}")
    if PRE_WAIT_TILES not in (1, 2, 3):
        raise ValueError(f"{op}: PRE_WAIT_TILES must be 1, 2 or 3, got {PRE_WAIT_TILES}")
    if WEIGHT_EVICTION not in EVICTION_POLICIES:
        raise ValueError(f"{op}: WEIGHT_EVICTION must be one of {EVICTION_POLICIES}, got {WEIGHT_EVICTION!r}")
    if POST_WAIT_PREFETCH not in (0, 1, 2, 3):
        raise ValueError(f"{op}: POST_WAIT_PREFETCH must be 0 to 3 tiles, got {POST_WAIT_PREFETCH}")
    if POST_WAIT_ORDER not in POST_WAIT_ORDERS:
        raise ValueError(f"{op}: POST_WAIT_ORDER must be one of {tuple(POST_WAIT_ORDERS)}, got {POST_WAIT_ORDER!r}")
    x, w = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w))
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    block_n, block_k, split_k, num_warps, num_stages = launch_plan(n, k, block_n)
    column_blocks = -(-n // block_n)
    if column_blocks > MAX_COLUMN_BLOCKS:
        raise ValueError(f"{op}: N = {n} is over {MAX_COLUMN_BLOCKS * block_n} columns")
    block_m = max(16, 1 << (m - 1).bit_length())
    part = sq = counters = None
    if split_k > 1:
        part = torch.empty(split_k * block_m * n, device=x.device, dtype=torch.float32)
        sq = torch.empty(column_blocks * split_k * block_m, device=x.device, dtype=torch.float32)
        counters = _counters(x.device)
    pdl = _pdl(x.device)
    launch_skinny_gemm(x, w, out, residual, norm_weight, eps, part, sq, counters, silu=silu, block_n=block_n,
                       block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                       pdl=pdl, prefetch=PREFETCH_L2 and pdl, rope=rope, ring=ring, pre_wait_tiles=PRE_WAIT_TILES,
                       weight_eviction=WEIGHT_EVICTION, post_wait_order=POST_WAIT_ORDERS[POST_WAIT_ORDER],
                       post_wait_prefetch=POST_WAIT_PREFETCH if pdl else 0)
    return out


def skinny_qkv_reference(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                         cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                         ring_k: torch.Tensor, ring_v: torch.Tensor, slots: torch.Tensor,
                         ring_rows: torch.Tensor) -> torch.Tensor:
    """The spec, as the unfused self layer computes it: the stacked q/k/v projection of
    rmsnorm(x), q and k rotated (rotate-half RoPE, fp32), k and v written to
    ring_k / ring_v[slots[m], ring_rows[m]]; returns [M, (Hq + 2 Hkv) d] (q and k rotated)."""
    m, d = x.shape[0], 2 * cos.shape[-1]
    y = skinny_linear_reference(x, w, norm_weight, eps)
    q, k, v = y.split([n_heads * d, n_kv_heads * d, n_kv_heads * d], dim=-1)

    def rotate(t: torch.Tensor, heads: int) -> torch.Tensor:
        tf = t.float().view(m, heads, d)
        t1, t2 = tf[..., : d // 2], tf[..., d // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1).to(t.dtype).view(m, heads * d)

    q, k = rotate(q, n_heads), rotate(k, n_kv_heads)
    ring_k[slots, ring_rows] = k.view(m, n_kv_heads, d).to(ring_k.dtype)
    ring_v[slots, ring_rows] = v.view(m, n_kv_heads, d).to(ring_v.dtype)
    return torch.cat([q, k, v], dim=-1)


def skinny_qkv(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
               sin: torch.Tensor, n_heads: int, n_kv_heads: int, ring_k: torch.Tensor, ring_v: torch.Tensor,
               slots: torch.Tensor, ring_rows: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """A self layer's decode projection in one kernel: `skinny_linear` of the stacked q/k/v weight
    with RoPE and the ring-buffer writes in its epilogue, so nothing runs between it and the
    attention over the ring. x: [M, K]; w: [(Hq + 2 Hkv) d, K]; cos, sin: fp32 [M, d / 2];
    ring_k, ring_v: [S, W, Hkv, d] (rows contiguous), written at [slots[m], ring_rows[m]] (int64
    [M]) -> [M, (Hq + 2 Hkv) d], q and k rotated. d a power of two >= 16 for the kernel.

    Raises ValueError for mismatched shapes, TypeError for bad dtypes."""
    op = "skinny_qkv"
    check_rank(op, "x", x, 2, "[M, K]")
    check_rank(op, "ring_k", ring_k, 4, "[S, W, Hkv, d]")
    check_dtype(op, "x", x, FLOAT_DTYPES)
    if w.dtype != x.dtype or ring_k.dtype != x.dtype or ring_v.dtype != x.dtype:
        raise TypeError(f"{op}: w {w.dtype} and the rings {ring_k.dtype}, {ring_v.dtype} must have x's dtype {x.dtype}")
    if norm_weight is not None and tuple(norm_weight.shape) != (x.shape[1],):
        raise ValueError(f"{op}: norm_weight {tuple(norm_weight.shape)} must be [K={x.shape[1]}]")
    m, d = x.shape[0], ring_k.shape[3]
    if tuple(cos.shape) != (m, d // 2) or sin.shape != cos.shape or cos.dtype != torch.float32 or d % 2:
        raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be fp32 [M={m}, d/2={d // 2}]")
    if w.dim() != 2 or w.shape[0] != (n_heads + 2 * n_kv_heads) * d or w.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: w {tuple(w.shape)} must be [(Hq + 2 Hkv) d = {(n_heads + 2 * n_kv_heads) * d}, "
                         f"K = {x.shape[1]}]")
    if ring_v.shape != ring_k.shape or ring_k.shape[2:] != (n_kv_heads, d):
        raise ValueError(f"{op}: rings {tuple(ring_k.shape)}, {tuple(ring_v.shape)} must be [S, W, Hkv={n_kv_heads}, "
                         f"d={d}]")
    for name, t in (("slots", slots), ("ring_rows", ring_rows)):
        check_dtype(op, name, t, (torch.int64,))
        if tuple(t.shape) != (m,):
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be [M={m}]")
    check_same_device(op, x=x, w=w, cos=cos, sin=sin, ring_k=ring_k, ring_v=ring_v, slots=slots,
                      ring_rows=ring_rows)
    if resolve_backend(backend, x.device, op) == "torch":
        return skinny_qkv_reference(x, w, norm_weight, eps, cos, sin, n_heads, n_kv_heads, ring_k, ring_v, slots,
                                    ring_rows)
    if d < 16 or d & (d - 1):
        raise ValueError(f"{op}: the Triton kernel needs head_dim a power of two >= 16, got {d}")
    strided = any(r.stride(3) != 1 or r.stride(2) != d for r in (ring_k, ring_v))
    if strided or ring_v.stride()[:2] != ring_k.stride()[:2]:
        raise ValueError(f"{op}: each ring row [Hkv, d] must be contiguous, both rings strided alike")
    return _launch(op, x, w, norm_weight, eps, False, None, block_n=d,
                   rope=(cos.contiguous(), sin.contiguous(), (n_heads + n_kv_heads) * d),
                   ring=(ring_k, ring_v, slots, ring_rows, n_heads * d, (n_heads + n_kv_heads) * d))


def launch_plan(n: int, k: int, block_n: int | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, split_k, num_warps, num_stages) for a [N, K] weight: its configuration
    (`block_n` in place of its BLOCK_N: one head per column block for RoPE), K split until the
    grid has about the configuration's number of programs."""
    config_n, block_k, programs, num_warps, num_stages = (SKINNY_CONFIG_INTERPRETED if interpreting()
                                                          else SKINNY_CONFIGS.get((n, k), SKINNY_CONFIG))
    block_n = block_n or config_n
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
    return PDL and device.type == "cuda" and not interpreting() and cuda_capability(device) >= 9


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


@torch.library.custom_op("clsa::skinny_qkv", mutates_args=("ring_k", "ring_v"))
def skinny_qkv_op(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, n_heads: int, n_kv_heads: int, ring_k: torch.Tensor, ring_v: torch.Tensor,
                  slots: torch.Tensor, ring_rows: torch.Tensor) -> torch.Tensor:
    """`skinny_qkv` through the Triton kernel as one opaque op (it writes the rings)."""
    return skinny_qkv(x, w, norm_weight, eps, cos, sin, n_heads, n_kv_heads, ring_k, ring_v, slots, ring_rows,
                      backend="triton")


@skinny_qkv_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
      sin: torch.Tensor, n_heads: int, n_kv_heads: int, ring_k: torch.Tensor, ring_v: torch.Tensor,
      slots: torch.Tensor, ring_rows: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])
