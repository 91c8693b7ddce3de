"""Attention kernels for index-reusing sparse decode. Tensors in, tensors out: no model knowledge.

Each op has a torch reference (the spec), a Triton kernel, and one public function taking
`backend="auto" | "torch" | "triton"` (auto: Triton on CUDA tensors, torch otherwise; "triton" on
CPU tensors runs under TRITON_INTERPRET=1). `SparseDecodeWrapper` splits sparse attention into a
once-per-step `plan()` and a once-per-layer `run()`.
"""

from kernels.decode_attention import SparseDecodeWrapper, dense_decode_attention, sparse_decode_attention
from kernels.index_topk import index_topk
from kernels.window_attention import window_attention

__all__ = ["SparseDecodeWrapper", "dense_decode_attention", "index_topk", "sparse_decode_attention", "window_attention"]
