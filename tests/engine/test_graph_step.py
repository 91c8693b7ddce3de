"""The fixed-shape decode step (what a CUDA graph captures) gives the eager decode's logits, with
padding rows, mixed attention modes and batches that shrink through the buckets."""

from __future__ import annotations

import pytest
import torch

from kernels._backend import interpreting
from services.engine import EngineConfig, LLMEngine
from services.engine.graph_step import DecodeGraphs, StaticDecodeStep, buckets_up_to
from services.engine.sampling import SamplingParams
from services.engine.sequence import Sequence
from services.engine.tokenizer import ByteTokenizer
from tests.conftest import make_engine, make_model, variant
from tests.helpers import random_prompt, record_logits, run_requests

# Prompts longer than the window (8) and k (6); different lengths and max_tokens, so the batch
# shrinks from 5 (CLSA 3 in a bucket of 4, DENSE 2) down to 1 as requests finish.
REQUESTS = [(21, "clsa", 9), (3, "dense", 4), (14, "clsa", 12), (9, "clsa", 6), (30, "dense", 10)]


def _generate(graphs: bool, backend: str = "torch", cfg=None, prepare=None) -> tuple[list, list]:  # noqa: ANN001
    engine = make_engine(**({"cfg": cfg} if cfg is not None else {}), attention_backend=backend)
    if prepare is not None:
        prepare(engine)
    if graphs:
        engine.runner.graphs = DecodeGraphs(engine.model, engine.cache, engine.index_topk, max_batch=4,
                                            backend=backend, capture=False)
    log = record_logits(engine)
    yoco = engine.model_config.is_yoco
    outs = run_requests(engine, [(random_prompt(n, seed=n), SamplingParams(max_tokens=t, temperature=0.0,
                                                                           ignore_eos=True), mode if yoco else None)
                                 for n, mode, t in REQUESTS])
    return [torch.stack(log[o.request_id]) for o in outs], [o.token_ids for o in outs]


@pytest.mark.parametrize("arch", ["yoco", "transformer"])
def test_static_step_gives_the_eager_decode_logits(arch: str) -> None:
    cfg = None if arch == "yoco" else variant(arch="transformer")
    want_logits, want_tokens = _generate(False, cfg=cfg)
    got_logits, got_tokens = _generate(True, cfg=cfg)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_static_step_on_triton_kernels_matches_the_eager_torch_decode() -> None:
    want_logits, want_tokens = _generate(False, "torch")
    got_logits, got_tokens = _generate(True, "triton")
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_static_step_over_the_gathered_selected_rows_matches_the_eager_torch_decode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """GATHER_SELECTED: each CLSA step's plan copies the selected K/V rows (the step's own token's
    included, written just before) into one buffer that every cross layer reads: the eager torch
    decode's tokens and logits, and the copy was made in every CLSA step (none in a DENSE one)."""
    import kernels.decode_attention as decode_attention
    import services.engine.attention as attention

    want_logits, want_tokens = _generate(False, "torch")
    monkeypatch.setattr(decode_attention, "GATHER_SELECTED", True)
    plans = []
    plan = attention.CrossAttention.plan

    def counting(self, q_idx, k_idx_cache, block_table, seq_lens, sparse, topk, kv=None) -> None:  # noqa: ANN001
        plan(self, q_idx, k_idx_cache, block_table, seq_lens, sparse, topk, kv=kv)
        plans.append((kv is not None and all(sparse), self.gathered is not None))
    monkeypatch.setattr(attention.CrossAttention, "plan", counting)
    got_logits, got_tokens = _generate(True, "triton")
    assert any(clsa for clsa, _ in plans)
    assert all(clsa == gathered for clsa, gathered in plans), plans
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not interpreting(), reason="the engine runs on CPU tensors: the kernel needs TRITON_INTERPRET=1")
def test_static_step_through_the_fused_qkv_kernel_matches_the_eager_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each self layer's q/k/v, RoPE and ring writes as one kernel (graph_step.FUSED_QKV_RING,
    here interpreted), the other projections through the skinny GEMM: the eager decode's tokens
    and logits, padding rows included (they write the spare slot's ring)."""
    import services.engine.graph_step as graph_step
    import services.engine.layers as layers
    from kernels.skinny_linear import skinny_qkv

    def fused(engine: LLMEngine) -> None:
        engine.model.fuse_projections()
    want_logits, want_tokens = _generate(False, prepare=fused)
    calls = []

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(args[1].shape)
        return skinny_qkv(*args, backend="triton")

    monkeypatch.setattr(graph_step, "FUSED_QKV_RING", True)
    monkeypatch.setattr(layers, "use_skinny", lambda x, w: x.numel() // x.shape[-1] <= 8)
    monkeypatch.setattr(layers, "skinny_qkv_op", counting)
    got_logits, got_tokens = _generate(True, "triton", prepare=fused)
    assert len(calls) >= 2 * make_model().cfg.n_self_layers  # every self layer, every step
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padding_block_and_slot_are_reserved_and_given_back() -> None:
    engine = make_engine(max_num_seqs=3)
    cache = engine.cache
    free_blocks, free_slots = cache.blocks.num_free, cache.slots.num_free
    graphs = DecodeGraphs(engine.model, cache, engine.index_topk, max_batch=2, capture=False)
    assert (cache.blocks.num_free, cache.slots.num_free) == (free_blocks - 1, free_slots - 1)
    graphs.close()
    assert (cache.blocks.num_free, cache.slots.num_free) == (free_blocks, free_slots)


def test_buckets_and_bad_batches_fail_clearly() -> None:
    assert buckets_up_to(1) == (1,)
    assert buckets_up_to(6) == (1, 2, 4, 6)
    assert buckets_up_to(8) == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="max_batch"):
        buckets_up_to(0)
    engine = make_engine()
    graphs = DecodeGraphs(engine.model, engine.cache, engine.index_topk, max_batch=2, capture=False)
    with pytest.raises(ValueError, match="largest bucket"):
        graphs.bucket(3)
    with pytest.raises(ValueError, match="empty batch"):
        graphs.decode([])
    step = StaticDecodeStep(engine.model, engine.cache, 1, True, engine.index_topk, graphs.trash_block,
                            graphs.spare_slot)
    params = SamplingParams(max_tokens=2)
    seqs = [Sequence.create(f"r{i}", [1, 2], params, sparse, 256, engine.tokenizer, None)
            for i, sparse in enumerate((True, False))]
    with pytest.raises(ValueError, match="bucket of 1"):
        step.load(seqs)
    with pytest.raises(ValueError, match="attention mode"):
        step.load(seqs[1:])
    with pytest.raises(ValueError, match="holds 0 blocks"):
        step.load(seqs[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("setting", ["default", "gathered-rows-in-l2", "fresh-ring-row-and-l2-next"])
def test_cuda_graph_replay_gives_the_eager_decode_logits(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured steps replay the eager decode; with the selected rows gathered once a step and
    kept in L2 by a window baked into the graph (decode_attention.GATHER_SELECTED,
    graph_step.L2_PERSIST_SELECTED), too; and with the ring read before the PDL wait but for the
    token's own row, each layer's attention asking L2 for its output projection
    (graph_step.RING_FRESH_ROW, L2_NEXT_WEIGHT)."""
    import kernels.decode_attention as decode_attention
    import services.engine.graph_step as graph_step
    from kernels import l2_persist

    selected_in_l2 = setting == "gathered-rows-in-l2"
    results = {}
    for graphs in (False, True):
        monkeypatch.setattr(decode_attention, "GATHER_SELECTED", selected_in_l2 and graphs)
        monkeypatch.setattr(graph_step, "L2_PERSIST_SELECTED", selected_in_l2 and graphs)
        monkeypatch.setattr(graph_step, "RING_FRESH_ROW", setting == "fresh-ring-row-and-l2-next" and graphs)
        monkeypatch.setattr(graph_step, "L2_NEXT_WEIGHT", setting == "fresh-ring-row-and-l2-next" and graphs)
        model = make_model().to("cuda")
        engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, num_blocks=256, prefill_chunk=5,
                                                               max_num_seqs=8, cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        log = record_logits(engine)
        outs = run_requests(engine, [(random_prompt(n, seed=n), SamplingParams(max_tokens=t, temperature=0.0,
                                                                               ignore_eos=True), mode)
                                     for n, mode, t in REQUESTS])
        results[graphs] = ([torch.stack(log[o.request_id]) for o in outs], [o.token_ids for o in outs])
        if graphs and selected_in_l2:
            assert engine.runner.graphs._persisting > 0  # the set-aside was made for a window
            clsa_steps = [(step, graph) for (_, sparse, _), (step, graph, _) in engine.runner.graphs._steps.items()
                          if sparse]
            assert clsa_steps
            for step, graph in clsa_steps:  # every kernel of a CLSA step's graph keeps its gathered rows
                windows, rows = l2_persist.graph_windows(graph.raw_cuda_graph()), step.attention.gathered.data_ptr()
                assert windows and all(base <= rows < base + n for base, n, _ in windows), windows
            engine.runner.graphs.close()
    assert results[True][1] == results[False][1]
    for got, want in zip(results[True][0], results[False][0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _generate_with_policy(policy: str, graphs: bool) -> tuple[list, list]:
    engine = make_engine(cross_attention=policy)
    if graphs:
        engine.runner.graphs = DecodeGraphs(engine.model, engine.cache, engine.index_topk, max_batch=4,
                                            capture=False, policy=policy)
    log = record_logits(engine)
    outs = run_requests(engine, [(random_prompt(n, seed=n), SamplingParams(max_tokens=t, temperature=0.0,
                                                                           ignore_eos=True), mode)
                                 for n, mode, t in REQUESTS])
    return [torch.stack(log[o.request_id]) for o in outs], [o.token_ids for o in outs]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static-step"])
@pytest.mark.parametrize("policy", ["per_layer", "torch_gather"])
def test_baseline_cross_policies_select_and_attend_as_clsa(policy: str, graphs: bool) -> None:
    """The benchmark's baselines (a top-k in every layer; plain torch scoring, topk, gather and
    SDPA) compute CLSA's function: same logits as the shared index."""
    want_logits, want_tokens = _generate_with_policy("shared", False)
    got_logits, got_tokens = _generate_with_policy(policy, graphs)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_cross_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="cross_attention must be one of"):
        EngineConfig(cross_attention="bogus")
    engine = make_engine()
    with pytest.raises(ValueError, match="policy must be one of"):
        DecodeGraphs(engine.model, engine.cache, engine.index_topk, max_batch=2, capture=False, policy="bogus")


@pytest.mark.parametrize("arch", ["yoco", "transformer"])
def test_fused_projections_change_no_output_and_no_checkpoint(arch: str) -> None:
    cfg = variant() if arch == "yoco" else variant(arch="transformer")
    model = make_model(cfg)
    tokens = torch.tensor([random_prompt(40, seed=3)])
    want = model.forward_full(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    torch.testing.assert_close(model.forward_full(tokens), want, atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    stacked = model.layers[0].fused
    assert stacked is not None and model.layers[0].wq.weight.data_ptr() == stacked.data_ptr()  # a view, no copy


def test_slot_tables_copy_only_what_changed_and_follow_a_new_owner() -> None:
    from services.engine.graph_step import SlotTables

    tables = SlotTables(n_slots=3, max_blocks=6, trash_block=9, device=torch.device("cpu"))
    params = SamplingParams(max_tokens=2)
    engine = make_engine()
    seq = Sequence.create("a", [1, 2], params, True, 256, engine.tokenizer, None)
    seq.slot, seq.block_ids = 1, [4, 5]
    tables.sync([seq])
    assert tables.table[1].tolist() == [4, 5, 9, 9, 9, 9]
    tables.table[1, 0] = 77  # a stale entry a sync must not rewrite when only blocks were added
    seq.block_ids.append(6)
    tables.sync([seq])
    assert tables.table[1].tolist() == [77, 5, 6, 9, 9, 9]
    other = Sequence.create("b", [3], params, True, 256, engine.tokenizer, None)
    other.slot, other.block_ids = 1, [2]  # the slot's next owner: its row is rewritten whole
    tables.sync([other])
    assert tables.table[1].tolist() == [2, 9, 9, 9, 9, 9]
    assert tables.table[0].tolist() == [9] * 6 and tables.table[2].tolist() == [9] * 6
    other.block_ids = list(range(7))
    with pytest.raises(ValueError, match="over the table width"):
        tables.sync([other])
    other.slot = -1
    with pytest.raises(ValueError, match="no ring slot"):
        tables.sync([other])
