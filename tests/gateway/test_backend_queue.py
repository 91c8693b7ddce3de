"""A decode backend with fewer sequence slots than requests: bundles wait in line for room
instead of failing, a cancelled waiter leaves nothing behind, and the admission limit still sheds."""

from __future__ import annotations

import asyncio

import pytest

from services.engine import EngineConfig, LLMEngine, SamplingParams
from services.gateway.backend import AdmissionQueueFull, LocalEngineBackend
from services.gateway.convert import GenerationRequest

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [f"request number {i}: the pass key is {10000 + i}" for i in range(6)]


def _bundles() -> list:
    prefill = LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=1))
    out = []
    for prompt in PROMPTS:
        _, bundle = prefill.prefill_to_bundle(prompt, PARAMS)
        assert bundle is not None
        out.append(bundle)
    return out


async def _continue(backend: LocalEngineBackend, bundle: object, i: int) -> list[int]:
    tokens: list[int] = []
    request = GenerationRequest(f"q-{i}", PROMPTS[i], PARAMS, None)
    async for out in backend.continue_bundle(bundle, request):  # type: ignore[arg-type]
        tokens = out.token_ids
    return tokens


def test_bundles_beyond_the_slots_wait_for_room_and_all_finish() -> None:
    want = [o.token_ids for o in LLMEngine.from_model("clsa-tiny").generate(PROMPTS, PARAMS)]
    backend = LocalEngineBackend(LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=2)), "clsa-tiny")
    try:
        async def main() -> list[list[int]]:
            return await asyncio.gather(*(_continue(backend, b, i) for i, b in enumerate(_bundles())))

        assert asyncio.run(main()) == want  # 6 requests through 2 slots, each continued exactly
        assert backend.stats()["requests_in_flight"] == 0 and backend.stats()["kv_blocks_used"] == 0
    finally:
        backend.stop()


def test_a_cancelled_waiter_and_the_admission_limit() -> None:
    backend = LocalEngineBackend(LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=1)), "clsa-tiny",
                                 max_in_flight=2)
    bundles = _bundles()
    slow = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    try:
        async def main() -> None:
            async def hold() -> None:
                async for _ in backend.continue_bundle(bundles[0], GenerationRequest("hold", PROMPTS[0], slow, None)):
                    pass

            holder = asyncio.create_task(hold())
            await asyncio.sleep(0.3)  # it owns the one slot
            waiter = asyncio.create_task(_continue(backend, bundles[1], 1))
            await asyncio.sleep(0.1)
            assert backend.stats()["requests_in_flight"] == 1 and not waiter.done()
            with pytest.raises(AdmissionQueueFull):  # one running + one waiting = the limit of 2
                await _continue(backend, bundles[2], 2)
            waiter.cancel()
            holder.cancel()
            await asyncio.gather(waiter, holder, return_exceptions=True)

        asyncio.run(main())
        for _ in range(100):
            if backend.stats()["requests_in_flight"] == 0 and backend.stats()["kv_blocks_used"] == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert backend.stats()["requests_in_flight"] == 0 and backend.stats()["kv_blocks_used"] == 0
        assert backend._waiting == 0
    finally:
        backend.stop()
