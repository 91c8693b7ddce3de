"""Argument checks the launchers share: clear errors instead of wrong results or crashes."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, shape_doc: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be {shape_doc}, got shape {tuple(t.shape)}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of ({names}), got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listing}")


def check_paged(op: str, block_table: torch.Tensor, seq_lens: torch.Tensor, batch: int) -> None:
    check_rank(op, "block_table", block_table, 2, "[B, max_blocks]")
    check_rank(op, "seq_lens", seq_lens, 1, "[B]")
    check_dtype(op, "block_table", block_table, (torch.int32,))
    check_dtype(op, "seq_lens", seq_lens, (torch.int32,))
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"{op}: batch mismatch: query has B={batch}, block_table {block_table.shape[0]}, "
            f"seq_lens {seq_lens.shape[0]}"
        )
