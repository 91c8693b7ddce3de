"""The incremental engine (paged cache, ring buffers, chunked prefill, top-k kernels) computes
exactly what the whole-sequence model computes, in both attention modes."""

from __future__ import annotations

import pytest
import torch

from kernels._backend import interpreting
from services.engine import SamplingParams
from tests.conftest import SMALL, make_engine, variant
from tests.helpers import GREEDY, random_prompt, record_logits, run_requests

ATOL = RTOL = 1e-4  # fp32 throughout; the paths differ only in summation order

CONFIGS = {
    "yoco": SMALL,
    "yoco-cross-rope": variant(cross_rope=True),
    "yoco-gqa1-w5": variant(n_kv_heads=1, swa_window=5),
    "transformer": variant(arch="transformer"),
}


def _expected_logits(engine, prompt: list[int], generated: list[int], attention: str) -> torch.Tensor:
    """Logits of the whole-sequence model at the positions the engine sampled from."""
    seq = torch.tensor([prompt + generated[:-1]])
    with torch.inference_mode():
        full = engine.model.forward_full(seq, attention, index_topk=engine.index_topk)[0]
    return full[len(prompt) - 1 :]


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 9, 13, 21, 40])
@pytest.mark.parametrize(
    ("cfg_name", "attention"),
    [("yoco", "clsa"), ("yoco", "dense"), ("yoco-cross-rope", "clsa"), ("yoco-gqa1-w5", "clsa"),
     ("yoco-gqa1-w5", "dense"), ("transformer", "dense")],
)
def test_prefill_then_decode_matches_whole_sequence(cfg_name: str, attention: str, prompt_len: int) -> None:
    # block 4, chunk 5, window 8 (or 5), k 6: lengths 1-40 plus 12 new tokens cross all of them
    engine = make_engine(CONFIGS[cfg_name])
    log = record_logits(engine)
    prompt = random_prompt(prompt_len, seed=prompt_len)
    [out] = run_requests(engine, [(prompt, GREEDY, attention)])
    got = torch.stack(log[out.request_id])
    assert got.shape[0] == len(out.token_ids) == GREEDY.max_tokens
    torch.testing.assert_close(got, _expected_logits(engine, prompt, out.token_ids, attention),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attention", ["clsa", "dense"])
def test_token_by_token_prefill_equals_chunked_prefill(attention: str) -> None:
    """Prefill with chunks of 1 (the full sequence through the model token by token), of 5 and of
    64 tokens give the same logits for the first token and every decode step."""
    prompt = random_prompt(37, seed=7)
    runs = []
    for chunk in (1, 5, 64):
        engine = make_engine(prefill_chunk=chunk)
        log = record_logits(engine)
        [out] = run_requests(engine, [(prompt, GREEDY, attention)])
        runs.append(torch.stack(log[out.request_id]))
    torch.testing.assert_close(runs[0], runs[1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(runs[0], runs[2], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prompt_len", [1, 10, 30])
def test_clsa_equals_dense_while_every_sequence_is_shorter_than_k(prompt_len: int) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    logs = {}
    for attention in ("clsa", "dense"):
        engine = make_engine(index_topk=64)  # 30 + 16 tokens < 64
        log = record_logits(engine)
        [out] = run_requests(engine, [(random_prompt(prompt_len, seed=1), params, attention)])
        logs[attention] = torch.stack(log[out.request_id])
    torch.testing.assert_close(logs["clsa"], logs["dense"], atol=1e-5, rtol=1e-5)


def test_clsa_differs_from_dense_once_sequences_exceed_k() -> None:
    logs = {}
    for attention in ("clsa", "dense"):
        engine = make_engine()  # k = 6
        log = record_logits(engine)
        [out] = run_requests(engine, [(random_prompt(40, seed=2), GREEDY, attention)])
        logs[attention] = torch.stack(log[out.request_id])
    assert (logs["clsa"] - logs["dense"]).abs().max() > 1e-2


def _softmax_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, d] over keys/values [n, Hkv, d], GQA by head group, written out."""
    group = q.shape[0] // keys.shape[1]
    out = []
    for h in range(q.shape[0]):
        kv = h // group
        weights = torch.softmax((keys[:, kv] @ q[h]) * scale, dim=0)
        out.append(weights @ values[:, kv])
    return torch.stack(out)


@torch.inference_mode()
def test_clsa_is_dense_attention_over_exactly_the_topk_positions() -> None:
    engine = make_engine()
    model, cfg = engine.model, engine.model.cfg
    log = record_logits(engine)
    prompt = random_prompt(30, seed=3)
    [out] = run_requests(engine, [(prompt, SamplingParams(max_tokens=1, temperature=0.0), "clsa")])
    got = log[out.request_id][0]

    # By hand: self layers over a window, written per query position.
    n = len(prompt)
    positions = torch.arange(n)[None]
    x = model.embed(torch.tensor([prompt]))
    for layer in model.layers:
        q, k, v = (t[0] for t in layer.qkv(x, positions))
        attn = [_softmax_attention(q[t], k[max(0, t - cfg.swa_window + 1) : t + 1],
                                   v[max(0, t - cfg.swa_window + 1) : t + 1], model.sm_scale) for t in range(n)]
        x = layer.finish(x, torch.stack(attn)[None])
    keys, values, k_idx, q_idx = (t[0] for t in model.shared(x, positions))
    scores = [float(q_idx[-1] @ k_idx[s]) for s in range(n)]
    selected = sorted(range(n), key=lambda s: -scores[s])[: engine.index_topk]
    h = x[:, -1:]
    for layer in model.cross_layers:
        q = layer.query(h, torch.tensor([[n - 1]]))[0, 0]
        attn = _softmax_attention(q, keys[selected], values[selected], model.sm_scale)
        h = layer.finish(h, attn[None, None])
    torch.testing.assert_close(got, model.logits(h)[0, 0].float(), atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not interpreting(), reason="the engine runs on CPU tensors: the kernel needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("rope_inside", [False, True], ids=["q-rotated-first", "rope-in-kernel"])
@pytest.mark.parametrize("attention", ["clsa", "dense"])
@pytest.mark.parametrize("chunk", [64, 5, 12])
def test_prefill_through_the_window_kernel_matches_whole_sequence(
        chunk: int, attention: str, rope_inside: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's prefill path: the self layers through the Triton window kernel (here
    interpreted; the queries rotated by the layer or, `WINDOW_ROPE`, by the kernel) - a first
    chunk over itself, later ones behind the ring (chunks of 5 and 12 around the window of 8) -
    prompts of different lengths batched (padding rows at the end), then decode: the
    whole-sequence model's logits."""
    import services.engine.model as model_module
    from kernels import window_attention

    calls = []

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("q_offset", 0))
        return window_attention(*args, **kwargs)

    monkeypatch.setattr(model_module, "use_window_kernel", lambda device, head_dim: True)
    monkeypatch.setattr(model_module, "WINDOW_BACKEND", "triton")
    monkeypatch.setattr(model_module, "WINDOW_ROPE", rope_inside)
    monkeypatch.setattr(model_module, "window_attention", counting)
    engine = make_engine(prefill_chunk=chunk)
    log = record_logits(engine)
    prompts = [random_prompt(n, seed=n) for n in (3, 26, 40, 11)]
    outs = run_requests(engine, [(p, GREEDY, attention) for p in prompts])
    assert 0 in calls and (chunk == 64 or SMALL.swa_window in calls)  # first chunks, and later ones behind the ring
    for prompt, out in zip(prompts, outs, strict=True):
        torch.testing.assert_close(torch.stack(log[out.request_id]),
                                   _expected_logits(engine, prompt, out.token_ids, attention), atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not interpreting(), reason="the engine runs on CPU tensors: the kernel needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("fused", [True, False], ids=["stacked-projections", "own-projections"])
@pytest.mark.parametrize("cfg_name", ["yoco", "transformer"])
def test_decode_through_the_skinny_gemm_kernel_matches_whole_sequence(
        cfg_name: str, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's decode projections: every projection of a few rows (the decode steps, the
    prefill's last position through the cross layers) through the Triton skinny-GEMM kernel
    (here interpreted), its norm, SiLU and residual fused - the whole-sequence model's logits."""
    import services.engine.layers as layers
    from kernels.skinny_linear import skinny_linear

    calls = []

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(args[1].shape)
        return skinny_linear(*args, backend="triton")

    monkeypatch.setattr(layers, "use_skinny", lambda x, w: x.numel() // x.shape[-1] <= 8)
    monkeypatch.setattr(layers, "skinny_linear_op", counting)
    engine = make_engine(CONFIGS[cfg_name], prefill_chunk=16)
    if fused:
        engine.model.fuse_projections()
    log = record_logits(engine)
    prompts = [random_prompt(n, seed=n) for n in (3, 26, 11)]
    outs = run_requests(engine, [(p, GREEDY, "dense" if cfg_name == "transformer" else "clsa") for p in prompts])
    cfg = engine.model.cfg
    assert (cfg.vocab_size, cfg.d_model) in calls and (cfg.d_model, cfg.ffn_dim) in calls  # LM head, FFN down
    monkeypatch.setattr(layers, "use_skinny", lambda x, w: False)
    for prompt, out in zip(prompts, outs, strict=True):
        torch.testing.assert_close(torch.stack(log[out.request_id]),
                                   _expected_logits(engine, prompt, out.token_ids,
                                                    "dense" if cfg_name == "transformer" else "clsa"),
                                   atol=ATOL, rtol=RTOL)
