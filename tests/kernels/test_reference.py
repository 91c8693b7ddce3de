"""The torch references of the kernel ops against brute force, and the launchers' argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import dense_decode_attention, index_topk, sparse_decode_attention

BLOCK = 16


def _paged(lens: list[int], feat: tuple[int, ...], dtype: torch.dtype, seed: int = 0):  # noqa: ANN202
    """Contiguous per-sequence rows scattered into shuffled physical blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // BLOCK) for n in lens]
    total = sum(blocks_per_seq) + 3
    perm = torch.randperm(total, generator=gen).tolist()
    cache = torch.randn((total, BLOCK, *feat), generator=gen).to(dtype)
    table = torch.full((len(lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    return cache, table, torch.tensor(lens, dtype=torch.int32)


def _row(cache: torch.Tensor, table: torch.Tensor, b: int, pos: int) -> torch.Tensor:
    return cache[int(table[b, pos // BLOCK]), pos % BLOCK]


@pytest.mark.parametrize("k", [1, 7, 64, 300])
@pytest.mark.parametrize("lens", [[63], [1, 111, 200, 17]], ids=["B1", "B4-ragged"])
def test_index_topk_picks_the_highest_scores(lens: list[int], k: int) -> None:
    cache, table, seq_lens = _paged(lens, (24,), torch.float32)
    q = torch.randn(len(lens), 24)
    got = index_topk(q, cache, table, seq_lens, k)
    assert got.shape == (len(lens), k) and got.dtype == torch.int32
    for b, n in enumerate(lens):
        scores = [float(q[b] @ _row(cache, table, b, s)) for s in range(n)]
        want = set(sorted(range(n), key=lambda s: -scores[s])[:k])
        row = got[b].tolist()
        assert set(p for p in row if p >= 0) == want
        assert row.count(-1) == max(0, k - n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("hq", "hkv"), [(1, 1), (4, 1), (8, 2)])
def test_sparse_attention_is_softmax_over_the_selected_rows(hq: int, hkv: int, dtype: torch.dtype) -> None:
    lens, d = [63, 5, 130], 32
    k_cache, table, seq_lens = _paged(lens, (hkv, d), dtype, seed=1)
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(dtype)
    q = torch.randn(len(lens), hq, d).to(dtype)
    gen = torch.Generator().manual_seed(2)
    indices = torch.full((len(lens), 9), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        pick = torch.randperm(n, generator=gen)[:9]
        indices[b, : len(pick)] = pick.int()
    scale = 1 / math.sqrt(d)
    out = sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, scale)
    assert out.dtype == dtype and out.shape == q.shape
    for b in range(len(lens)):
        sel = [p for p in indices[b].tolist() if p >= 0]
        keys = torch.stack([_row(k_cache, table, b, p) for p in sel]).float()
        values = torch.stack([_row(v_cache, table, b, p) for p in sel]).float()
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax(keys[:, kv] @ q[b, h].float() * scale, dim=0)
            torch.testing.assert_close(out[b, h].float(), w @ values[:, kv], atol=2e-3, rtol=2e-3)


def test_dense_attention_matches_sdpa_on_a_contiguous_cache() -> None:
    lens, hq, hkv, d = [111, 1, 47], 8, 2, 64
    k_cache, table, seq_lens = _paged(lens, (hkv, d), torch.float32, seed=3)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(lens), hq, d)
    out = dense_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)
    for b, n in enumerate(lens):
        keys = torch.stack([_row(k_cache, table, b, p) for p in range(n)])  # [n, Hkv, d]
        values = torch.stack([_row(v_cache, table, b, p) for p in range(n)])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b][:, None], keys.transpose(0, 1), values.transpose(0, 1), scale=0.125, enable_gqa=True)
        torch.testing.assert_close(out[b], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_all_indices_missing_gives_zeros() -> None:
    k_cache, table, seq_lens = _paged([10], (1, 8), torch.float32)
    out = sparse_decode_attention(torch.randn(1, 2, 8), k_cache, k_cache.clone(), table, seq_lens,
                                  torch.full((1, 4), -1, dtype=torch.int32), 1.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_launchers_refuse_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    k_cache, table, seq_lens = _paged([10], (2, 8), torch.float32)
    q = torch.randn(1, 4, 8)
    idx = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table must be one of \\(int32\\)"):
        dense_decode_attention(q, k_cache, k_cache, table.long(), seq_lens, 1.0)
    with pytest.raises(ValueError, match=r"Hq \(3\) must be a multiple of Hkv \(2\)"):
        dense_decode_attention(torch.randn(1, 3, 8), k_cache, k_cache, table, seq_lens, 1.0)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        sparse_decode_attention(torch.randn(1, 4, 16), k_cache, k_cache, table, seq_lens, idx, 1.0)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, d\]"):
        sparse_decode_attention(q[0], k_cache, k_cache, table, seq_lens, idx, 1.0)
    with pytest.raises(ValueError, match="batch mismatch"):
        index_topk(torch.randn(2, 8), torch.randn(4, BLOCK, 8), table, seq_lens, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        index_topk(torch.randn(1, 8), torch.randn(4, BLOCK, 8), table, seq_lens, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        index_topk(torch.randn(1, 8), torch.randn(4, BLOCK, 8), table, seq_lens, 4, backend="cuda")  # type: ignore[arg-type]
    from kernels._backend import triton_available

    assert triton_available()  # import triton under the interpreter setting first: it reads it once
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="on cpu tensors needs TRITON_INTERPRET=1"):
        index_topk(torch.randn(1, 8), torch.randn(4, BLOCK, 8), table, seq_lens, 4, backend="triton")


def test_window_attention_reference_is_softmax_over_the_last_window_keys() -> None:
    from kernels.window_attention import window_attention_reference

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, h, 8, generator=gen) for h in (4, 2, 2))
    got = window_attention_reference(q, k, v, 3, 0.5)
    for b, t, h in ((0, 0, 0), (1, 2, 3), (0, 8, 1), (1, 5, 2)):
        lo = max(0, t - 2)
        keys, values = k[b, lo : t + 1, h // 2], v[b, lo : t + 1, h // 2]
        want = torch.softmax(keys @ q[b, t, h] * 0.5, dim=0) @ values
        torch.testing.assert_close(got[b, t, h], want)


def test_window_attention_reference_behind_earlier_keys() -> None:
    """A later chunk: 4 queries behind 6 keys of earlier tokens, the first 2 of them not there."""
    from kernels.window_attention import window_attention_reference

    gen = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(1, 4, 2, 8, generator=gen), torch.randn(1, 10, 1, 8, generator=gen), \
        torch.randn(1, 10, 1, 8, generator=gen)
    got = window_attention_reference(q, k, v, 5, 0.5, q_offset=6, key_start=2)
    for t in range(4):
        lo = max(2, t + 6 - 4)
        want = torch.softmax(k[0, lo : t + 7, 0] @ q[0, t, 1] * 0.5, dim=0) @ v[0, lo : t + 7, 0]
        torch.testing.assert_close(got[0, t, 1], want)


def test_window_attention_refuses_bad_arguments() -> None:
    from kernels import window_attention

    q, k = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match=r"q must be \[B, Tq, Hq, d\]"):
        window_attention(q[0], k, k, 2, 1.0)
    with pytest.raises(ValueError, match=r"Hq \(4\) must be a multiple of Hkv \(3\)"):
        window_attention(q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16), 2, 1.0)
    with pytest.raises(ValueError, match="must be \\[B=1, Tq \\+ q_offset=5, Hkv, d=16\\]"):
        window_attention(q, k[:, :4], k[:, :4], 2, 1.0)
    with pytest.raises(ValueError, match="need 0 <= key_start <= q_offset"):
        window_attention(q[:, :3], k, k, 2, 1.0, q_offset=2, key_start=3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_attention(q, k, k, 0, 1.0)
    with pytest.raises(ValueError, match="must match"):
        window_attention(q, k, k.half(), 2, 1.0)
    with pytest.raises(ValueError, match="head_dim a power of two"):
        window_attention(torch.randn(1, 5, 4, 24), torch.randn(1, 5, 2, 24), torch.randn(1, 5, 2, 24), 2, 1.0,
                         backend="triton")
