"""Triton kernels against the torch references: through Triton's interpreter on the CPU (CI), or
compiled on a CUDA device when run with TRITON_INTERPRET=0 on a machine that has one.

Grids with odd sizes: lengths that are not multiples of the block size, k larger than a sequence,
ragged batches, GQA groups of 1, 4 and 8, head_dim 64 and 128, fp32 and fp16 (and bf16 on CUDA).
Outputs are poisoned first (NaN, or an impossible position) so an element the kernel never writes
fails. bf16 stays out of the interpreter, which computes bf16 arithmetic wrongly; it also runs one
fixed launch configuration (no autotuning).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import kernels.decode_attention as decode_attention
import kernels.triton_attention as triton_attention
from kernels import SparseDecodeWrapper, dense_decode_attention, index_topk, sparse_decode_attention
from kernels._backend import interpreting
from kernels.decode_attention import dense_decode_attention_reference, sparse_decode_attention_reference
from kernels.index_topk import index_topk_reference
from tests.kernels.triton_device import DEVICE, DTYPES

index_topk_module = importlib.import_module("kernels.index_topk")  # the package exports the function


BLOCK = 16
POISON = 0x7FFF_FFF0
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _paged(lens: list[int], feat: tuple[int, ...], dtype: torch.dtype, seed: int):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // BLOCK) for n in lens]
    total = sum(per_seq) + 2
    perm = torch.randperm(total, generator=gen).tolist()
    cache = torch.randn((total, BLOCK, *feat), generator=gen).to(dtype)
    table = torch.full((len(lens), max(per_seq) + 1), -1, dtype=torch.int32)  # a spare column of -1
    for b, nb in enumerate(per_seq):
        table[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    return cache.to(DEVICE), table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


LENGTH_CASES = {"one-63": [63], "ragged": [1, 111, 200, 17], "one-1": [1], "long-4231": [4231]}


TOPK_GRID = [
    (case, k, dtype)
    for case in ("one-63", "ragged", "one-1")
    for k in (1, 7, 64, 300)
    for dtype in DTYPES
] + [("long-4231", 64, torch.float32), ("long-4231", 300, torch.float32)]  # the interpreter is slow


@pytest.fixture(params=[True, False], ids=["one-launch", "four-launches"])
def topk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """index_topk cooperatively in one launch, and phase by phase in four (more rows than SMs)."""
    monkeypatch.setattr(index_topk_module, "COOPERATIVE", request.param)


@pytest.mark.usefixtures("topk_path")
@pytest.mark.parametrize(("case", "k", "dtype"), TOPK_GRID,
                         ids=[f"{c}-k{k}-{DTYPE_IDS[d]}" for c, k, d in TOPK_GRID])
def test_index_topk(case: str, k: int, dtype: torch.dtype) -> None:
    lens = LENGTH_CASES[case]
    cache, table, seq_lens = _paged(lens, (24,), dtype, seed=k)
    q = torch.randn(len(lens), 24).to(dtype).to(DEVICE)
    out = torch.full((len(lens), k), POISON, dtype=torch.int32, device=DEVICE)
    index_topk(q, cache, table, seq_lens, k, backend="triton", out=out)
    want = index_topk_reference(q, cache, table, seq_lens, k)
    for b in range(len(lens)):
        got_row, want_row = sorted(out[b].tolist()), sorted(want[b].tolist())
        assert got_row == want_row, f"row {b} (len {lens[b]}): {len(set(got_row) ^ set(want_row))} positions differ"


@pytest.mark.usefixtures("topk_path")
@pytest.mark.parametrize(("case", "k"), [("long-4231", 300), ("ragged", 64), ("one-63", 7)])
def test_index_topk_with_two_blocks_of_keys_in_flight(case: str, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scoring loop's deeper prefetch (two blocks of keys in flight) selects the same positions."""
    for name in ("INTERPRET_CONFIG", "COOP_CONFIG", "COOP_SMALL_CONFIG", "TOPK_CONFIG"):
        monkeypatch.setattr(index_topk_module, name, (*getattr(index_topk_module, name)[:4], 2))
    lens = LENGTH_CASES[case]
    cache, table, seq_lens = _paged(lens, (24,), torch.float32, seed=k + 1)
    q = torch.randn(len(lens), 24).to(DEVICE)
    out = index_topk(q, cache, table, seq_lens, k, backend="triton")
    want = index_topk_reference(q, cache, table, seq_lens, k)
    for b in range(len(lens)):
        assert sorted(out[b].tolist()) == sorted(want[b].tolist()), f"row {b} (len {lens[b]})"


@pytest.mark.usefixtures("topk_path")
def test_index_topk_with_exact_ties_and_negative_scores() -> None:
    cache = torch.ones(8, BLOCK, 32, device=DEVICE)
    cache[2] = -3.0  # positions 32-47 score lower
    table = torch.arange(8, dtype=torch.int32, device=DEVICE)[None]
    seq_lens = torch.tensor([120], dtype=torch.int32, device=DEVICE)
    out = index_topk(-torch.ones(1, 32, device=DEVICE), cache, table, seq_lens, 20, backend="triton")
    # scores: -32 everywhere except +96 at positions 32-47: those 16 win, then 4 of the ties
    got = out[0].tolist()
    assert len(set(got)) == 20 and set(range(32, 48)) <= set(got) and all(0 <= p < 120 for p in got)


@pytest.mark.usefixtures("topk_path")
def test_index_topk_resolves_scores_that_share_their_high_bits() -> None:
    # 1 + j * 2^-20: equal in sign, exponent and top 7 mantissa bits, apart only in the low 16 bits
    n = 700
    values = 1.0 + torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() * 2.0**-20
    cache = torch.zeros(-(-n // BLOCK), BLOCK, 8)
    cache.view(-1, 8)[:n, 0] = values
    table = torch.arange(cache.shape[0], dtype=torch.int32)[None]
    q = torch.zeros(1, 8)
    q[0, 0] = 1.0
    out = index_topk(q.to(DEVICE), cache.to(DEVICE), table.to(DEVICE),
                     torch.tensor([n], dtype=torch.int32, device=DEVICE), 77, backend="triton")
    assert sorted(out[0].tolist()) == sorted(values.topk(77).indices.tolist())


@pytest.mark.usefixtures("topk_path")
@pytest.mark.parametrize("shift", [-50.0, 0.0, 50.0])
def test_index_topk_lower_bound_filter_keeps_the_exact_set(shift: float) -> None:
    # 2,000 positions, k 50: the row has enough sub-blocks for a lower bound, so only scores at or
    # above it reach the histogram; all-negative, mixed and all-positive scores
    n, k = 2000, 50
    cache, table, seq_lens = _paged([n], (16,), torch.float32, seed=11)
    q = torch.randn(1, 16, device=DEVICE)
    q[0, 0] = 1.0
    cache[..., 0] = shift  # adds `shift` to every score
    out = index_topk(q, cache, table, seq_lens, k, backend="triton")
    want = index_topk_reference(q, cache, table, seq_lens, k)
    assert sorted(out[0].tolist()) == sorted(want[0].tolist())


@pytest.mark.usefixtures("topk_path")
def test_index_topk_resolves_many_candidates_by_their_low_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past RANK_BLOCK candidates at the threshold digit, the finish switches from a sort in registers
    # to a radix select on the low digits: force it, and check the same exact sets.
    monkeypatch.setattr(importlib.import_module("kernels.triton_topk"), "RANK_BLOCK", 2)
    cache, table, seq_lens = _paged([1000, 290, 3000], (16,), torch.float32, seed=9)
    q = torch.randn(3, 16, device=DEVICE)
    for k in (7, 300):
        out = index_topk(q, cache, table, seq_lens, k, backend="triton")
        want = index_topk_reference(q, cache, table, seq_lens, k)
        assert [sorted(r) for r in out.tolist()] == [sorted(r) for r in want.tolist()]


@pytest.mark.usefixtures("topk_path")
def test_index_topk_leaves_its_workspace_zeroed_for_the_next_call() -> None:
    # No memset per call: each call zeroes the histogram bins and counters it touched. A bin left
    # behind would corrupt the next call's threshold, so check the whole workspace after a mixed batch.
    triton_topk = importlib.import_module("kernels.triton_topk")
    cache, table, seq_lens = _paged([300, 7, 1000], (16,), torch.float32, seed=5)
    for k in (5, 64):
        q = torch.randn(3, 16, device=DEVICE)
        out = index_topk(q, cache, table, seq_lens, k, backend="triton")
        want = index_topk_reference(q, cache, table, seq_lens, k)
        assert [sorted(r) for r in out.tolist()] == [sorted(r) for r in want.tolist()]
        work = triton_topk._WORKSPACE[q.device]
        assert int(work.count_nonzero()) == 0


@pytest.fixture(params=[True, False], ids=["fused-merge", "merge-kernel"])
def merge_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with the splits merged by their last program, and with the separate merge kernel."""
    names = ("INTERPRET_CONFIG",) if interpreting() else ("SPARSE_CONFIG", "SPARSE_SMALL_CONFIG", "DENSE_CONFIG")
    for name in names:
        block_n, warps, stages, _ = getattr(decode_attention, name)
        monkeypatch.setattr(decode_attention, name, (block_n, warps, stages, request.param))


def _attention_case(group: int, head_dim: int, dtype: torch.dtype, seed: int):  # noqa: ANN202
    lens, n_kv_heads = [63, 5, 130], 2 if group < 8 else 1
    k_cache, table, seq_lens = _paged(lens, (n_kv_heads, head_dim), dtype, seed)
    v_cache = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    q = torch.randn(len(lens), group * n_kv_heads, head_dim).to(dtype)
    return q.to(DEVICE), k_cache, v_cache.to(DEVICE), table, seq_lens


def _indices(seq_lens: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.full((len(seq_lens), k), -1, dtype=torch.int32)
    for b, n in enumerate(seq_lens.tolist()):
        pick = torch.randperm(n, generator=gen)[:k].int()
        slots = torch.randperm(k, generator=gen)[: len(pick)]  # -1 holes anywhere in the row
        idx[b, slots] = pick
    return idx.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_sparse_decode_attention(group: int, head_dim: int, dtype: torch.dtype, merge_path: None) -> None:
    q, k_cache, v_cache, table, seq_lens = _attention_case(group, head_dim, dtype, seed=group + head_dim)
    indices = _indices(seq_lens, 40, seed=group)  # 40 > 5: the short row is mostly -1
    out = torch.full_like(q, float("nan"))
    sm_scale = 1 / math.sqrt(head_dim)
    sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, sm_scale, backend="triton", out=out)
    want = sparse_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, indices, sm_scale)
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("group", "n_kv_heads"), [(1, 2), (4, 1), (8, 1), (3, 3), (3, 8)])
def test_sparse_decode_attention_wide_kernel(group: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The wide kernel (every KV head of a token in one program), Hkv not a power of two included."""
    monkeypatch.setattr(decode_attention, "WIDE_MIN_BATCH", 0)
    lens = [63, 5, 130]
    k_cache, table, seq_lens = _paged(lens, (n_kv_heads, head_dim), dtype, seed=group + n_kv_heads)
    v_cache = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    q = torch.randn(len(lens), group * n_kv_heads, head_dim).to(dtype).to(DEVICE)
    indices = _indices(seq_lens, 40, seed=group)
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, 0.1, backend="triton", out=out)
    want = sparse_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, indices, 0.1)
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_split_planner_keeps_a_whole_wave_within_the_slots() -> None:
    """clsa-4b at 128K (8 KV heads, k = 2048, 64-row blocks) on 132 SMs holding 3 programs each:
    at B = 7 the whole-wave plan takes 7 splits (392 programs) where the default takes 8 (448,
    past the 396 slots); B = 1 to 6 plan alike either way."""
    plan_splits = triton_attention.plan_splits
    assert plan_splits(2048, 7 * 8, 132, 64, 3) == (8, 256)
    assert plan_splits(2048, 7 * 8, 132, 64, 3, whole_wave=True) == (7, 320)
    for batch in range(1, 7):
        assert plan_splits(2048, batch * 8, 132, 64, 3, whole_wave=True) == plan_splits(2048, batch * 8, 132, 64, 3)
    for batch in range(1, 65):
        n_splits, split_size = plan_splits(2048, batch * 8, 132, 64, 3, whole_wave=True)
        assert batch * 8 * n_splits <= 396 or n_splits == 1
        assert (n_splits - 1) * split_size < 2048 <= n_splits * split_size


@pytest.mark.parametrize("ahead", ["", "rows", "kv", "prefetch"],
                         ids=["in-block", "rows-ahead", "kv-ahead", "prefetch"])
@pytest.mark.parametrize("whole_wave", [False, True], ids=["default-plan", "whole-wave"])
@pytest.mark.parametrize("together", [True, False], ids=["kv-together", "kv-apart"])
def test_sparse_small_batch_any_split_plan(whole_wave: bool, ahead: str, together: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Five KV heads make the two plans differ on the interpreter's 4 SMs (2 splits or 3 of 80
    indices, 2 or 3 blocks each), each with a short last split; each block's rows (or rows and
    K/V) loaded with it or one block ahead, or (compiled, PDL: inline PTX) the next blocks' lines
    asked of L2 before the wait, past the split's end too; K's use tied to V's load
    (`KV_TOGETHER`, off by default) or not."""
    if ahead == "prefetch" and not decode_attention._pdl(torch.device(DEVICE), 1):
        pytest.skip("the L2 prefetch runs only compiled with PDL (Hopper or later)")
    monkeypatch.setattr(decode_attention, "SPARSE_SMALL_WHOLE_WAVE", whole_wave)
    monkeypatch.setattr(triton_attention, "KV_TOGETHER", together)
    monkeypatch.setattr(triton_attention, "SPARSE_ROWS_AHEAD", ahead == "rows")
    monkeypatch.setattr(triton_attention, "SPARSE_KV_AHEAD", ahead == "kv")
    monkeypatch.setattr(triton_attention, "SPARSE_PREFETCH_BLOCKS", 3 if ahead == "prefetch" else 0)
    lens = [300]
    k_cache, table, seq_lens = _paged(lens, (5, 64), torch.float32, seed=11)
    v_cache = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    q = torch.randn(len(lens), 10, 64).to(DEVICE)
    indices = _indices(seq_lens, 80, seed=13)
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, 0.125, backend="triton", out=out)
    want = sparse_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, indices, 0.125)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_sparse_wide_kernel_any_heads_per_program(heads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each KV head group of a token read as one piece: one head (the tile widened to 16 tokens),
    two, or all eight - with splits merged MERGE_CHUNK at a time past 32 of them."""
    monkeypatch.setattr(decode_attention, "WIDE_MIN_BATCH", 0)
    monkeypatch.setattr(decode_attention, "INTERPRET_WIDE_CONFIG", (4, heads, 1, 1, 64))
    lens = [700, 5, 300]
    k_cache, table, seq_lens = _paged(lens, (8, 64), torch.float32, seed=heads)
    v_cache = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q = torch.randn(len(lens), 24, 64).to(DEVICE)
    indices = _indices(seq_lens, 200, seed=heads)
    out = torch.full_like(q, float("nan"))
    sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, 0.125, backend="triton", out=out)
    want = sparse_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, indices, 0.125)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("merge_path")
def test_dense_decode_attention_merges_many_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    # More splits than one program reads at once (MERGE_ELEMS): the fused merge sums them
    # MERGE_CHUNK at a time, the merge kernel gives each program a narrower slice of d.
    monkeypatch.setattr(decode_attention, "DENSE_WAVES", 1000)
    k_cache, table, seq_lens = _paged([2100, 40, 700], (2, 64), torch.float32, seed=11)  # 132 splits of 16
    v_cache = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    q = torch.randn(3, 8, 64).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    dense_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, backend="triton", out=out)
    want = dense_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, 0.125)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_dense_decode_attention(group: int, head_dim: int, dtype: torch.dtype, merge_path: None) -> None:
    q, k_cache, v_cache, table, seq_lens = _attention_case(group, head_dim, dtype, seed=3 * group + head_dim)
    out = torch.full_like(q, float("nan"))
    sm_scale = 1 / math.sqrt(head_dim)
    dense_decode_attention(q, k_cache, v_cache, table, seq_lens, sm_scale, backend="triton", out=out)
    want = dense_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, sm_scale)
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("waves", [16, 1], ids=["block-a-split", "blocks-a-split"])
def test_dense_decode_attention_with_a_fresh_row_gives_the_same_answer(
        waves: int, merge_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fresh` (the row the kernel ahead writes, read again after the PDL wait in place of the one
    read before): wherever it falls - a split's first block, a later block, a block's last row,
    the last position, none (-1) - the answer is the reference's. (That the re-read cures a stale
    row is what the compiled race check shows: bench/ring_race.py, run by test_skinny_linear.py.)"""
    monkeypatch.setattr(decode_attention, "DENSE_WAVES", waves)  # 1: splits of several blocks
    q, k_cache, v_cache, table, seq_lens = _attention_case(4, 64, torch.float32, seed=21)
    sm_scale = 0.125
    want = dense_decode_attention_reference(q, k_cache, v_cache, table, seq_lens, sm_scale)
    for fresh in ([0, 4, 129], [15, -1, 16], [62, 2, 47], [-1, -1, -1]):  # lens 63, 5, 130
        out = torch.full_like(q, float("nan"))
        dense_decode_attention(q, k_cache, v_cache, table, seq_lens, sm_scale, backend="triton", out=out,
                               fresh=torch.tensor(fresh, device=DEVICE))
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=f"fresh rows {fresh}")
    with pytest.raises(ValueError, match="fresh has 2 entries for a batch of 3"):
        dense_decode_attention(q, k_cache, v_cache, table, seq_lens, sm_scale, fresh=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="fresh must be one of"):
        dense_decode_attention(q, k_cache, v_cache, table, seq_lens, sm_scale, fresh=torch.zeros(3))


def test_asking_l2_for_the_next_weight_changes_no_value() -> None:
    """`l2_next` (the next projection's weight asked of L2 while the kernel runs; compiled with PDL
    only - the interpreter has no inline assembly) leaves every output bit as it was."""
    q, k_cache, v_cache, table, seq_lens = _attention_case(4, 64, torch.float32, seed=23)
    weight = torch.randn(300, 70, device=DEVICE)  # not a multiple of a line, nor of the programs
    plain = dense_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, backend="triton")
    asked = dense_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, backend="triton", l2_next=weight)
    assert torch.equal(plain, asked)
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(table, seq_lens, _indices(seq_lens, 40, seed=2), BLOCK)
    plain = wrapper.run(q, k_cache, v_cache, 0.125)
    assert torch.equal(plain, wrapper.run(q, k_cache, v_cache, 0.125, l2_next=weight))
    if not interpreting():
        with pytest.raises(ValueError, match="contiguous"):
            dense_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, backend="triton", l2_next=weight.t())


def test_dense_layers_share_one_workspace_and_leave_its_counters_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer after layer (the ring attention of every self layer) through the one kept set of
    partials, merged by the last split (DENSE_FUSED_MAX_BATCH): each layer's own answer, and the
    split counters back to zero for the next step (a CUDA graph replays them as they are)."""
    monkeypatch.setattr(decode_attention, "DENSE_FUSED_MAX_BATCH", 64)
    q, k_cache, v_cache, table, seq_lens = _attention_case(4, 64, torch.float32, seed=5)
    workspace: dict = {}
    for layer in range(3):
        q_layer = torch.randn_like(q)
        got = dense_decode_attention(q_layer, k_cache, v_cache, table, seq_lens, 0.125, backend="triton",
                                     workspace=workspace)
        want = dense_decode_attention_reference(q_layer, k_cache, v_cache, table, seq_lens, 0.125)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
    ((_, _, counters),) = workspace.values()
    assert int(counters.count_nonzero()) == 0


def test_wrapper_plans_once_and_runs_every_layer() -> None:
    q, k_cache, v_cache, table, seq_lens = _attention_case(4, 64, torch.float32, seed=9)
    indices = index_topk(torch.randn(3, 16, device=DEVICE), torch.randn(k_cache.shape[0], BLOCK, 16, device=DEVICE),
                         table, seq_lens, 24, backend="triton")
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(table, seq_lens, indices, BLOCK)
    for layer in range(3):
        q_layer = torch.randn_like(q)
        got = wrapper.run(q_layer, k_cache, v_cache, 0.125)
        want = sparse_decode_attention_reference(q_layer, k_cache, v_cache, table, seq_lens, indices, 0.125)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
    with pytest.raises(ValueError, match="planned for block_size 16"):
        wrapper.run(q, k_cache[:, :8], v_cache[:, :8], 0.125)
    with pytest.raises(RuntimeError, match=r"run\(\) before plan\(\)"):
        SparseDecodeWrapper("triton").run(q, k_cache, v_cache, 0.125)


def test_wrapper_gathers_the_selected_rows_once_and_every_layer_reads_the_copy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GATHER_SELECTED: the plan copies each sequence's selected K/V rows into one compact buffer
    (zeros where an index is -1 or past the sequence), the layers over those caches read it (the
    first after its PDL wait) and match the reference; a run over other caches reads its own."""
    monkeypatch.setattr(decode_attention, "GATHER_SELECTED", True)
    q, k_cache, v_cache, table, seq_lens = _attention_case(4, 64, torch.float32, seed=21)
    indices = _indices(seq_lens, 40, seed=22)
    indices[0, 3] = int(seq_lens[0])  # past the sequence: no row
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(table, seq_lens, indices, BLOCK, gather_from=(k_cache, v_cache))
    kv = wrapper.gathered
    assert kv is not None and kv.shape == (2, *indices.shape, *k_cache.shape[2:])
    for b in range(indices.shape[0]):
        for j, pos in enumerate(indices[b].tolist()):
            if 0 <= pos < int(seq_lens[b]):
                block, slot = int(table[b, pos // BLOCK]), pos % BLOCK
                torch.testing.assert_close(kv[0, b, j], k_cache[block, slot], atol=0, rtol=0)
                torch.testing.assert_close(kv[1, b, j], v_cache[block, slot], atol=0, rtol=0)
            else:
                assert not kv[:, b, j].any(), (b, j, pos)
    for layer in range(3):
        q_layer = torch.randn_like(q)
        got = wrapper.run(q_layer, k_cache, v_cache, 0.125)
        want = sparse_decode_attention_reference(q_layer, k_cache, v_cache, table, seq_lens, indices, 0.125)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
    other_k, other_v = torch.randn_like(k_cache), torch.randn_like(v_cache)
    got = wrapper.run(q, other_k, other_v, 0.125)
    want = sparse_decode_attention_reference(q, other_k, other_v, table, seq_lens, indices, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The next plan gathers into the same buffer (what a CUDA graph replays into).
    wrapper.plan(table, seq_lens, _indices(seq_lens, 40, seed=23), BLOCK, gather_from=(k_cache, v_cache))
    assert wrapper.gathered is kv
    with pytest.raises(ValueError, match="contiguous rows"):
        wrapper.plan(table, seq_lens, indices, BLOCK, gather_from=(k_cache[..., :32], v_cache[..., :32]))


@pytest.mark.parametrize("wide", [False, True], ids=["per-head", "wide"])
def test_row_with_no_valid_index_is_zero(wide: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if wide:
        monkeypatch.setattr(decode_attention, "WIDE_MIN_BATCH", 0)
    q, k_cache, v_cache, table, seq_lens = _attention_case(1, 64, torch.float32, seed=2)
    indices = torch.full((3, 8), -1, dtype=torch.int32, device=DEVICE)
    out = sparse_decode_attention(q, k_cache, v_cache, table, seq_lens, indices, 0.125, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


WINDOW_CASES = {  # (B, T, Hq, Hkv, d, window)
    "gqa3-ragged": (2, 77, 6, 2, 64, 20),
    "mha-window1": (1, 40, 2, 2, 32, 1),
    "window-over-T": (1, 35, 4, 1, 16, 500),
    "gqa4-d128": (1, 70, 4, 1, 128, 33),
    "interior-blocks": (1, 130, 2, 1, 32, 64),  # windows spanning several whole key blocks
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_attention(case: str, dtype: torch.dtype) -> None:
    """Against the spec, with q/k/v strided views into one projection output (as the layers make
    them), lengths no multiple of the blocks, windows of 1 and longer than the sequence."""
    from kernels import window_attention
    from kernels.window_attention import window_attention_reference

    b, t, hq, hkv, d, window = WINDOW_CASES[case]
    gen = torch.Generator().manual_seed(t)
    fused = torch.randn(b, t, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
    got = window_attention(q, k, v, window, 1 / math.sqrt(d), backend="triton")
    want = window_attention_reference(q, k, v, window, 1 / math.sqrt(d))
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    # Padding rows at the end change nothing before them.
    shorter = window_attention(q[:, : t - 9].contiguous(), k[:, : t - 9].contiguous(), v[:, : t - 9].contiguous(),
                               window, 1 / math.sqrt(d), backend="triton")
    torch.testing.assert_close(shorter, got[:, : t - 9], atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("heads_first", [True, False], ids=["heads-first", "blocks-first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(("case", "q_offset"), [("gqa3-ragged", 0), ("gqa4-d128", 0), ("gqa3-ragged", 20)])
def test_window_attention_rotates_unrotated_queries(case: str, q_offset: int, dtype: torch.dtype, heads_first: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """q handed over as projected, with its RoPE angles (the prefill's path): the kernel's result is
    that of rotating q first - for a first chunk and one behind earlier keys, the grid either way."""
    import importlib

    from kernels import window_attention
    window_module = importlib.import_module("kernels.window_attention")  # the package's name is the function
    from kernels.window_attention import rotate_half, window_attention_reference

    monkeypatch.setattr(window_module, "WINDOW_HEADS_FIRST", heads_first)
    b, t, hq, hkv, d, window = WINDOW_CASES[case]
    gen = torch.Generator().manual_seed(t + q_offset)
    fused = torch.randn(b, t, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
    if q_offset:
        k, v = (torch.cat([torch.randn(b, q_offset, hkv, d, generator=gen).to(dtype).to(DEVICE), x], dim=1)
                for x in (k, v))
    positions = torch.arange(t, device=DEVICE)[None, :].expand(b, t) + 1000 * torch.arange(b, device=DEVICE)[:, None]
    angles = positions.float()[..., None] / 10000 ** (torch.arange(d // 2, device=DEVICE).float() / (d // 2))
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # as layers.rope_angles leaves them
    got = window_attention(q, k, v, window, 1 / math.sqrt(d), q_offset=q_offset, backend="triton", q_rope=(cos, sin))
    want = window_attention_reference(rotate_half(q, cos[:, :, 0], sin[:, :, 0]), k, v, window, 1 / math.sqrt(d),
                                      q_offset)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    unrotated = window_attention(q, k, v, window, 1 / math.sqrt(d), q_offset=q_offset, backend="triton")
    assert (unrotated - want).abs().max() > 10 * TOL[dtype]  # the rotation is not a no-op here


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize(("q_offset", "key_start", "window"), [(20, 0, 20), (20, 13, 20), (20, 20, 20), (5, 3, 20),
                                                               (45, 9, 50), (64, 0, 64)])
def test_window_attention_behind_earlier_keys(q_offset: int, key_start: int, window: int,
                                              dtype: torch.dtype) -> None:
    """A later prefill chunk: the queries behind q_offset keys of earlier tokens (the ring, in
    position order), the first key_start of them absent (fewer than W tokens came before)."""
    from kernels import window_attention
    from kernels.window_attention import window_attention_reference

    gen = torch.Generator().manual_seed(q_offset + key_start)
    b, tq, hq, hkv, d = 2, 37, 6, 2, 32
    q = torch.randn(b, tq, hq, d, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(b, tq + q_offset, hkv, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    got = window_attention(q, k, v, window, 0.2, q_offset=q_offset, key_start=key_start, backend="triton")
    want = window_attention_reference(q, k, v, window, 0.2, q_offset, key_start)
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
