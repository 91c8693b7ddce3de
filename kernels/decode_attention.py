"""Decode attention over a paged K/V cache: sparse (over selected positions) and dense (all).

Both take one query token per sequence, GQA heads (`Hq % Hkv == 0`), accumulate in fp32 and return
the query's dtype.
"""

from __future__ import annotations

import torch

from kernels._backend import Backend, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_paged, check_rank, check_same_device
from kernels.paged import gather_tokens


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The spec: softmax over the positions in `indices` (entries < 0 or >= seq_lens ignored).
    A row with no valid position yields zeros."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    keys = gather_tokens(k_cache, block_table, indices).float()  # [B, n, Hkv, d]
    values = gather_tokens(v_cache, block_table, indices).float()
    valid = (indices >= 0) & (indices < seq_lens[:, None])
    qg = q.float().view(batch, n_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, keys) * sm_scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgn,bnhd->bhgd", probs, values)
    return out.reshape(batch, n_q_heads, head_dim).to(q.dtype)


def dense_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The spec: softmax over every position < seq_lens[b]."""
    max_len = int(seq_lens.max()) if q.shape[0] else 0
    positions = torch.arange(max_len, device=q.device, dtype=torch.int32).expand(q.shape[0], max_len)
    return sparse_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, positions, sm_scale)


def _check(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    check_rank(op, "q", q, 3, "[B, Hq, d]")
    check_rank(op, "k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, d]")
    check_dtype(op, "q", q, FLOAT_DTYPES)
    check_dtype(op, "k_cache", k_cache, FLOAT_DTYPES)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{op}: head_dim mismatch: q {q.shape[2]}, cache {k_cache.shape[3]}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"{op}: Hq ({q.shape[1]}) must be a multiple of Hkv ({k_cache.shape[2]})")
    check_paged(op, block_table, seq_lens, q.shape[0])
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one query per sequence over the selected positions of a paged cache.

    q: [B, Hq, d]; k_cache, v_cache: [num_blocks, block_size, Hkv, d]; block_table: [B, max_blocks]
    int32; seq_lens: [B] int32; indices: [B, k] int32 token positions, -1 ignored. Returns
    out [B, Hq, d] in q's dtype.
    """
    op = "sparse_decode_attention"
    _check(op, q, k_cache, v_cache, block_table, seq_lens)
    check_rank(op, "indices", indices, 2, "[B, k]")
    check_dtype(op, "indices", indices, (torch.int32,))
    if indices.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: indices has B={indices.shape[0]}, q has B={q.shape[0]}")
    check_same_device(op, q=q, indices=indices)
    resolve_backend(backend, q.device, op)
    return sparse_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, indices, sm_scale)


def dense_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one query per sequence over all positions < seq_lens[b] of a paged cache.

    Shapes as `sparse_decode_attention`, without `indices`.
    """
    op = "dense_decode_attention"
    _check(op, q, k_cache, v_cache, block_table, seq_lens)
    resolve_backend(backend, q.device, op)
    return dense_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, sm_scale)
