"""The unit of disaggregation: everything a decode engine needs to continue a prefilled request.

A prefill engine runs the prompt and exports one `KVBundle`: the global cache rows of every prompt
position (YOCO: the shared K/V and the indexer keys, which travel together - K/V without their
index keys would decode wrong; transformer: every layer's K/V), the self layers' ring buffers, the
first generated token, and the model fingerprint. A decode engine refuses a bundle of another
model, writes the rows into blocks of its own pool and decodes from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.cache import KVCache
from services.engine.errors import InvalidRequestError


@dataclass
class KVBundle:
    fingerprint: str
    prompt_ids: list[int]
    first_token: int
    k: torch.Tensor  # [n_kv_caches, n, Hkv, d]
    v: torch.Tensor  # [n_kv_caches, n, Hkv, d]
    k_idx: torch.Tensor  # [n, d_idx] (d_idx 0 for the transformer)
    swa_k: torch.Tensor  # [n_self_layers, W, Hkv, d]
    swa_v: torch.Tensor
    swa_pos: torch.Tensor  # [W] int64
    rng_state: torch.Tensor | None = None  # the request's sampler state after its first token (seeded requests)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_idx, self.swa_k, self.swa_v))

    def to(self, device: torch.device | str) -> KVBundle:
        return KVBundle(self.fingerprint, self.prompt_ids, self.first_token, self.k.to(device), self.v.to(device),
                        self.k_idx.to(device), self.swa_k.to(device), self.swa_v.to(device),
                        self.swa_pos.to(device), self.rng_state)


def _rows(cache: KVCache, block_ids: list[int], n_tokens: int) -> torch.Tensor:
    """Flat cache rows of positions 0..n_tokens-1 of a sequence holding `block_ids`."""
    bs = cache.block_size
    pos = torch.arange(n_tokens, device=cache.k.device)
    blocks = torch.tensor(block_ids, dtype=torch.long, device=cache.k.device)
    return blocks[pos // bs] * bs + pos % bs


def export_bundle(cache: KVCache, block_ids: list[int], slot: int, prompt_ids: list[int], first_token: int,
                  fingerprint: str) -> KVBundle:
    """Copy a prefilled sequence's state out of the cache (the caller then frees its blocks)."""
    rows = _rows(cache, block_ids, len(prompt_ids))
    flat = cache.k.shape[1] * cache.k.shape[2]
    k = cache.k.reshape(cache.k.shape[0], flat, *cache.k.shape[3:])[:, rows].clone()
    v = cache.v.reshape(cache.v.shape[0], flat, *cache.v.shape[3:])[:, rows].clone()
    k_idx = cache.k_idx.reshape(flat, cache.k_idx.shape[-1])[rows].clone()
    return KVBundle(fingerprint, list(prompt_ids), first_token, k, v, k_idx, cache.swa_k[:, slot].clone(),
                    cache.swa_v[:, slot].clone(), cache.swa_pos[slot].clone())


def import_bundle(cache: KVCache, bundle: KVBundle, block_ids: list[int], slot: int) -> None:
    """Write a bundle into blocks (and a ring slot) already allocated to a sequence. The caller has
    checked that the bundle comes from its model (the fingerprint)."""
    expected = (cache.k.shape[0], bundle.n_tokens, *cache.k.shape[3:])
    if tuple(bundle.k.shape) != expected or bundle.swa_k.shape != cache.swa_k[:, slot].shape:
        raise InvalidRequestError("bundle", f"K/V of shape {tuple(bundle.k.shape)}, expected {expected}")
    rows = _rows(cache, block_ids, bundle.n_tokens)
    flat = cache.k.shape[1] * cache.k.shape[2]
    device, dtype = cache.k.device, cache.k.dtype
    cache.k.view(cache.k.shape[0], flat, *cache.k.shape[3:])[:, rows] = bundle.k.to(device, dtype)
    cache.v.view(cache.v.shape[0], flat, *cache.v.shape[3:])[:, rows] = bundle.v.to(device, dtype)
    cache.k_idx.view(flat, cache.k_idx.shape[-1])[rows] = bundle.k_idx.to(device, dtype)
    cache.swa_k[:, slot] = bundle.swa_k.to(device, dtype)
    cache.swa_v[:, slot] = bundle.swa_v.to(device, dtype)
    cache.swa_pos[slot] = bundle.swa_pos.to(device)
