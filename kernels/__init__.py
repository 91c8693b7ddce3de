"""Attention kernels for index-reusing sparse decode. Tensors in, tensors out: no model knowledge.

Each op has a torch reference (the spec) and one public function taking
`backend="auto" | "torch" | "triton"` (auto: Triton on CUDA tensors, torch otherwise).
"""

from kernels.decode_attention import dense_decode_attention, sparse_decode_attention
from kernels.index_topk import index_topk

__all__ = ["dense_decode_attention", "index_topk", "sparse_decode_attention"]
