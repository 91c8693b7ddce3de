"""The engine with the Triton kernels (interpreted on the CPU) gives the torch reference's logits."""

from __future__ import annotations

import torch

from tests.conftest import make_engine
from tests.helpers import GREEDY, random_prompt, record_logits, run_requests


def test_engine_on_triton_kernels_matches_torch_reference() -> None:
    prompts = [random_prompt(n, seed=n) for n in (21, 3, 9)]
    modes = ["clsa", "dense", "clsa"]  # one batch mixing both modes
    logs = {}
    for backend in ("torch", "triton"):
        engine = make_engine(attention_backend=backend, max_num_seqs=4)
        log = record_logits(engine)
        outs = run_requests(engine, [(p, GREEDY, m) for p, m in zip(prompts, modes)])
        logs[backend] = [torch.stack(log[o.request_id]) for o in outs]
    for got, want in zip(logs["triton"], logs["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
