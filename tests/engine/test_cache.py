"""The paged cache: one shared K/V (+ indexer key) per token for the whole cross-decoder,
blocks handed out and returned, and a clear error when they run out."""

from __future__ import annotations

import pytest
import torch

from services.engine import OutOfBlocksError, SamplingParams
from services.engine.cache import FreeList
from tests.conftest import make_engine, variant
from tests.helpers import GREEDY, random_prompt, run_requests


@pytest.mark.parametrize("n_layers", [4, 8, 16])
def test_yoco_cache_holds_one_kv_per_token_for_all_cross_layers(n_layers: int) -> None:
    cfg = variant(n_layers=n_layers)
    engine = make_engine(cfg)
    fp32 = 4
    # K and V of one shared projection + one indexer key: independent of the layer count.
    expected = (2 * cfg.n_kv_heads * cfg.head_dim + cfg.index_dim) * fp32
    assert engine.cache.bytes_per_token == expected
    assert cfg.kv_bytes_per_token(fp32) == expected

    engine.add_request(random_prompt(21, seed=0), SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()  # prefill: blocks for 21 tokens
    blocks = -(-21 // engine.cache.block_size)
    assert engine.cache.blocks.num_used == blocks
    assert engine.cache.bytes_in_use == blocks * engine.cache.block_size * expected


def test_transformer_cache_holds_kv_of_every_layer() -> None:
    cfg = variant(arch="transformer", n_layers=8)
    engine = make_engine(cfg)
    assert engine.cache.bytes_per_token == 2 * 8 * cfg.n_kv_heads * cfg.head_dim * 4
    yoco = make_engine(variant(n_layers=8))
    # With these shapes YOCO's cache per token is (2*2*16 + 16) / (2*8*2*16) = 80/512 of the transformer's.
    assert yoco.cache.bytes_per_token * 512 == engine.cache.bytes_per_token * 80


def test_blocks_return_to_the_pool_after_finish_and_abort() -> None:
    engine = make_engine()
    run_requests(engine, [(random_prompt(30, seed=1), GREEDY, None)])
    assert engine.cache.blocks.num_used == 0
    rid = engine.add_request(random_prompt(30, seed=2), GREEDY)
    engine.step()
    engine.step()
    assert engine.cache.blocks.num_used > 0
    engine.abort_request(rid)
    assert engine.cache.blocks.num_used == 0 and engine.cache.slots.num_used == 0
    assert not engine.has_unfinished_requests()


def test_request_larger_than_the_pool_is_a_clear_error() -> None:
    engine = make_engine(num_blocks=8)  # 32 tokens
    with pytest.raises(OutOfBlocksError, match="needs 13 KV blocks .*the pool has 8"):
        engine.add_request(random_prompt(40, seed=0), GREEDY)
    assert not engine.has_unfinished_requests()


def test_requests_wait_for_blocks_instead_of_failing() -> None:
    engine = make_engine(num_blocks=16)  # 64 tokens: room for one 40+12 request at a time
    outs = run_requests(engine, [(random_prompt(40, seed=i), GREEDY, None) for i in range(3)])
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert engine.cache.blocks.num_used == 0


def test_free_list_refuses_double_free_and_overdraw() -> None:
    pool = FreeList(4, "KV block")
    ids = pool.allocate(3)
    with pytest.raises(OutOfBlocksError, match="out of KV blocks: need 2, 1 free of 4"):
        pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError, match="freed but not allocated"):
        pool.free(ids[:1])


def test_decode_writes_shared_kv_at_its_block_and_row() -> None:
    engine = make_engine()
    engine.add_request(random_prompt(6, seed=0), SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()
    [seq] = engine.scheduler.running
    engine.step()  # position 6 -> block seq.block_ids[1], row 2
    row = engine.cache.k[0, seq.block_ids[1], 2]
    assert torch.count_nonzero(row) > 0
    assert torch.count_nonzero(engine.cache.k[0, seq.block_ids[1], 3]) == 0
