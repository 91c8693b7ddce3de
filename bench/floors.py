"""Floors for one sparse layer at B=1 in a chain of 16 (the 16-layer target): how fast a kernel of
the sparse layer's grid can go when it does less and less of the layer's work.

Each row times 16 launches back to back in one CUDA graph (programmatic dependent launch where
the row says so), each launch reading the selected K/V rows of a different cache (L2-cold, as in
a model whose GEMMs evict L2), and reports the time per launch:

- empty: wait on the previous kernel, store one value (the launch floor of a PDL chain);
- read: each program reads its split's K and V rows (issued before the wait, as ours) and stores
  their sum - the bytes of the layer and nothing else;
- read + q + partial: also loads the query after the wait and stores a [G, d] fp32 partial;
- + merge: also counts itself in on an atomic counter, and the last split of each head reads all
  partials of the head and writes the output (the fused merge's round trips);
- ours: `SparseDecodeWrapper.run`, the layer itself.

Run on the GPU: `python bench/floors.py` (about 30 s); prints a table, writes floors.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl
from sweep_kernels import HKV, HQ, PAGE, D, _chain_inputs, graph_of, graph_us, paged_case

import kernels.triton_attention as ta
from kernels import SparseDecodeWrapper
from kernels.decode_attention import SPARSE_SMALL_CONFIG

G = HQ // HKV


@triton.jit
def _floor_kernel(k_ptr, v_ptr, rows_ptr, q_ptr, part_ptr, counter_ptr, out_ptr, split_size, n_splits,
                  stride_kr, stride_kh, LEVEL: tl.constexpr, HKV_: tl.constexpr, G_: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_GM: tl.constexpr, D_: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr):
    """LEVEL 0 empty, 1 read, 2 read + q + partial, 3 + merge (see the module docstring). B = 1.
    EARLY: the trigger for the next kernel at the start, not after the wait."""
    h = tl.program_id(0)
    if USE_PDL:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(1)
    offs_d = tl.arange(0, D_)
    offs_g = tl.arange(0, BLOCK_G)
    if LEVEL >= 1:
        offs_n = split * split_size + tl.arange(0, BLOCK_N)
        valid = offs_n < (split + 1) * split_size
        rows = tl.load(rows_ptr + offs_n, mask=valid, other=0).to(tl.int64)
        offs = rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    if LEVEL == 0:
        tl.store(out_ptr + h * n_splits + split, 1.0)
    elif LEVEL == 1:
        tl.store(out_ptr + h * n_splits + split, tl.sum(tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=1), axis=0))
    else:
        mask_g = offs_g < G_
        q = tl.load(q_ptr + (h * G_ + offs_g)[:, None] * D_ + offs_d[None, :], mask=mask_g[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        part = tl.dot(s.to(v.dtype), v)
        part_offs = ((h * G_ + offs_g)[:, None] * n_splits + split) * D_ + offs_d[None, :]
        tl.store(part_ptr + part_offs, part, mask=mask_g[:, None])
        if LEVEL == 3:
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + h, 1, sem="acq_rel", scope="gpu")
            if done == n_splits - 1:
                offs_gm = tl.arange(0, BLOCK_GM)
                offs_s = tl.arange(0, BLOCK_S)
                mask_gm = offs_gm < G_
                mask_gs = mask_gm[:, None] & (offs_s < n_splits)[None, :]
                heads = h * G_ + offs_gm
                allp = tl.load(part_ptr + ((heads[:, None, None] * n_splits + offs_s[None, :, None]) * D_
                                           + offs_d[None, None, :]), mask=mask_gs[:, :, None], other=0.0,
                               cache_modifier=".cg")
                o = tl.sum(allp, axis=1)
                tl.store(out_ptr + heads[:, None] * D_ + offs_d[None, :], o, mask=mask_gm[:, None])
                tl.store(counter_ptr + h, 0)
        else:
            tl.store(out_ptr + h * n_splits + split, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/floors.py times kernels on a GPU: no CUDA device here")
    gen = torch.Generator().manual_seed(0)
    case = paged_case(1, 131072, gen)
    _, caches, qs, nbytes = _chain_inputs(case, 1)
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(case["table"], case["lens"], case["idx"], PAGE)
    rows = wrapper._plan["rows"][0]
    block_n = SPARSE_SMALL_CONFIG[0]
    n_items = rows.numel()
    n_splits = n_items // block_n
    part = torch.empty(HQ * n_splits * D, device="cuda", dtype=torch.float32)
    counter = torch.zeros(HKV, device="cuda", dtype=torch.int32)
    out = torch.empty(HQ * D + HKV * n_splits, device="cuda", dtype=torch.float32)
    k0 = caches[0][0]

    def launch(level: int, pdl: bool, i: int, early: bool = False) -> None:
        kc, vc = caches[i % len(caches)]
        extra = {"launch_pdl": True} if pdl else {}
        _floor_kernel[(HKV, n_splits)](kc, vc, rows, qs[i], part, counter, out, block_n, n_splits,
                                       k0.stride(1), k0.stride(2), LEVEL=level, HKV_=HKV, G_=G,
                                       BLOCK_G=max(16, triton.next_power_of_2(G)),
                                       BLOCK_GM=triton.next_power_of_2(G), D_=D, BLOCK_N=block_n,
                                       BLOCK_S=triton.next_power_of_2(n_splits), USE_PDL=pdl, EARLY=early,
                                       num_warps=SPARSE_SMALL_CONFIG[1], num_stages=1, **extra)

    rows_out = []
    names = {0: "empty", 1: "read", 2: "read + q + partial", 3: "+ merge (last split)"}
    for level in (0, 1, 2, 3):
        for pdl, early in ((True, True), (True, False), (False, False)):
            per_call = graph_us(lambda level=level, pdl=pdl, early=early:
                                [launch(level, pdl, i, early) for i in range(16)]) / 16
            one = graph_us(lambda level=level, pdl=pdl, early=early: launch(level, pdl, 0, early))
            rows_out.append({"what": names[level], "pdl": "early" if early else pdl,
                             "per_call_of_16": round(per_call, 2), "one": round(one, 2)})
            print(rows_out[-1], flush=True)
    scale = 1 / math.sqrt(D)
    saved_early = ta.PARTIAL_EARLY_TRIGGER
    ref = wrapper.run(case["q"], case["k"], case["v"], scale).float()
    for early in (False, True):
        ta.PARTIAL_EARLY_TRIGGER = early
        chain_out = torch.empty(16, *case["q"].shape, device="cuda", dtype=case["q"].dtype)
        graph = graph_of(lambda chain_out=chain_out: [
            wrapper.run(qs[i], *caches[i % len(caches)], scale, out=chain_out[i]) for i in range(16)])
        graph.replay()
        want = torch.stack([wrapper.run(qs[i], *caches[i % len(caches)], scale).float() for i in range(16)])
        err = ((chain_out.float() - want).norm() / want.norm()).item()
        per_call = graph_us(lambda: [wrapper.run(qs[i], *caches[i % len(caches)], scale) for i in range(16)]) / 16
        one = graph_us(lambda: wrapper.run(case["q"], case["k"], case["v"], scale))
        rows_out.append({"what": "ours (SparseDecodeWrapper.run)", "pdl": "early" if early else True,
                         "per_call_of_16": round(per_call, 2), "one": round(one, 2), "chain_err": err,
                         "one_err": ((wrapper.run(case["q"], case["k"], case["v"], scale).float() - ref).norm()
                                     / ref.norm()).item()})
        print(rows_out[-1], flush=True)
    ta.PARTIAL_EARLY_TRIGGER = saved_early
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "floors.json").write_text(json.dumps(rows_out, indent=1))
    print(f"\nB=1, N=128K, k=2048, {HKV} KV heads x {n_splits} splits of {block_n} rows; one layer's K/V rows: "
          f"{nbytes / 2**20:.0f} MiB; 60 us for 16 layers = 3.75 us a layer")
    print(f"{'kernel':<34} {'PDL':>6} {'per call of 16 us':>18} {'alone us':>9}")
    for r in rows_out:
        pdl = {True: "yes", False: "no"}.get(r["pdl"], r["pdl"])
        print(f"{r['what']:<34} {pdl:>6} {r['per_call_of_16']:>18.2f} {r['one']:>9.2f}")


if __name__ == "__main__":
    main()
