"""index_topk: the CLSA indexer's scores over a paged cache of indexer keys, and the top-k positions.

Computed once per decode step; every cross layer reuses the returned `indices`.
"""

from __future__ import annotations

import torch

from kernels._backend import Backend, interpreting, num_sms, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_paged, check_rank, check_same_device
from kernels.paged import gather_tokens

OP = "index_topk"
# (scoring BLOCK_N, num_warps, num_stages, finishing num_warps, blocks of keys in flight while one
# is scored): the four-launch path, for more rows than fit at once, with TOPK_WAVES programs per
# SM; the one-launch cooperative path, with COOP_CTAS_PER_SM programs per SM, all resident at once
# (registers capped at COOP_MAX_REGISTERS per thread so that they fit), and up to SMALL_BATCH rows
# with COOP_SMALL_CONFIG. From bench/sweep_kernels.py --tune on an H200 (docs/kernels.md).
TOPK_CONFIG = (64, 4, 1, 8, 1)
COOP_CONFIG = (64, 4, 1, 4, 1)
COOP_SMALL_CONFIG = (32, 4, 1, 4, 2)
SMALL_BATCH = 1
INTERPRET_CONFIG = (16, 1, 1, 1, 1)
COOP_MAX_REGISTERS = 128
TOPK_WAVES = 8
COOP_CTAS_PER_SM = 4
COOPERATIVE = True  # one launch whenever the rows x members fit on the card at once
LANES_PER_K = 4  # lane maxima each row publishes, per k: more give a tighter histogram filter


def index_topk_reference(
    q_idx: torch.Tensor,
    k_idx_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The spec. Scores `q_idx[b] . k_idx[b, s]` in fp32 over `s < seq_lens[b]`; returns the
    positions of the `k` highest as `[B, k]` int32, `-1` where the sequence has fewer than k."""
    batch = q_idx.shape[0]
    out = torch.full((batch, k), -1, dtype=torch.int32, device=q_idx.device)
    max_len = int(seq_lens.max()) if batch else 0
    if max_len == 0:
        return out
    positions = torch.arange(max_len, device=q_idx.device).expand(batch, max_len)
    keys = gather_tokens(k_idx_cache, block_table, positions)  # [B, N, d_idx]
    scores = torch.einsum("bd,bnd->bn", q_idx.float(), keys.float())
    valid = positions < seq_lens[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    top = scores.topk(min(k, max_len), dim=1)
    chosen_valid = torch.gather(valid, 1, top.indices)
    out[:, : top.indices.shape[1]] = torch.where(chosen_valid, top.indices, -1).int()
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, k: int) -> None:
    check_rank(OP, "q_idx", q_idx, 2, "[B, d_idx]")
    check_rank(OP, "k_idx_cache", k_idx_cache, 3, "[num_blocks, block_size, d_idx]")
    check_dtype(OP, "q_idx", q_idx, FLOAT_DTYPES)
    check_dtype(OP, "k_idx_cache", k_idx_cache, FLOAT_DTYPES)
    check_paged(OP, block_table, seq_lens, q_idx.shape[0])
    check_same_device(OP, q_idx=q_idx, k_idx_cache=k_idx_cache, block_table=block_table, seq_lens=seq_lens)
    if q_idx.shape[1] != k_idx_cache.shape[2]:
        raise ValueError(f"{OP}: d_idx mismatch: q_idx {q_idx.shape[1]}, k_idx_cache {k_idx_cache.shape[2]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{OP}: k must be a positive int, got {k!r}")


def index_topk(
    q_idx: torch.Tensor,
    k_idx_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k: int,
    *,
    backend: Backend = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k token positions of the single-head indexer for each sequence.

    q_idx: [B, d_idx]; k_idx_cache: [num_blocks, block_size, d_idx]; block_table: [B, max_blocks]
    int32; seq_lens: [B] int32. Returns indices [B, k] int32: positions (not physical rows) of the
    k highest scores among positions < seq_lens[b], -1 where fewer exist. Order within a row is
    unspecified. Raises ValueError/TypeError on bad shapes, dtypes or devices. The Triton path keeps
    a zeroed workspace per device that each call leaves zeroed: calls on one device must not run
    concurrently on two CUDA streams.
    """
    _check(q_idx, k_idx_cache, block_table, seq_lens, k)
    if out is not None and (out.shape != (q_idx.shape[0], k) or out.dtype != torch.int32
                            or out.device != q_idx.device):
        raise ValueError(f"{OP}: out must be [{q_idx.shape[0]}, {k}] int32 on {q_idx.device}")
    if resolve_backend(backend, q_idx.device, OP) == "torch":
        result = index_topk_reference(q_idx, k_idx_cache, block_table, seq_lens, k)
        return result if out is None else out.copy_(result)
    out = out if out is not None else torch.empty((q_idx.shape[0], k), dtype=torch.int32, device=q_idx.device)
    batch = q_idx.shape[0]
    if batch == 0:
        return out
    sms = num_sms(q_idx.device)
    resident = COOP_CTAS_PER_SM * sms
    # The interpreter runs programs one after another: a cooperative row has a single member there.
    cooperative = COOPERATIVE and (interpreting() or batch <= resident) and q_idx.device not in _NO_COOP
    if cooperative:
        try:
            _launch(q_idx, k_idx_cache, block_table, seq_lens, k, out, True, sms)
            return out
        except RuntimeError as exc:  # the grid does not fit at once on this card: launch phase by phase
            if "cooperative" not in str(exc):
                raise
            _NO_COOP.add(q_idx.device)
    _launch(q_idx, k_idx_cache, block_table, seq_lens, k, out, False, sms)
    return out


_NO_COOP: set[torch.device] = set()  # devices where the cooperative grid was refused


def _launch(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
            k: int, out: torch.Tensor, cooperative: bool, sms: int) -> None:
    from kernels.triton_topk import launch_index_topk

    batch = q_idx.shape[0]
    if interpreting():
        block_n, num_warps, num_stages, finish_warps, ahead = INTERPRET_CONFIG
        members = 1 if cooperative else _cdiv(TOPK_WAVES * sms, batch)
    elif cooperative:
        config = COOP_SMALL_CONFIG if batch <= SMALL_BATCH else COOP_CONFIG
        block_n, num_warps, num_stages, finish_warps, ahead = config
        members = COOP_CTAS_PER_SM * sms // batch
    else:
        block_n, num_warps, num_stages, finish_warps, ahead = TOPK_CONFIG
        members = _cdiv(TOPK_WAVES * sms, batch)
    launch_index_topk(q_idx, k_idx_cache, block_table, seq_lens, k, out, n_members=members, cooperative=cooperative,
                      block_n=block_n, num_warps=num_warps, num_stages=num_stages, finish_warps=finish_warps,
                      lanes_per_row=LANES_PER_K * k, max_registers=COOP_MAX_REGISTERS, ahead=ahead)
