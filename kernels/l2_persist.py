"""Keep one buffer in L2 across the kernels of a CUDA graph: the persisting-L2 set-aside and an
access-policy window, through the CUDA driver API (ctypes on libcuda; torch exposes neither).

Every cross layer of a CLSA decode step reads the same selected K/V rows (56 MiB at 128K, B = 7),
and 189 MB of weights stream through L2 between two layers' reads, so under L2's normal policy
each layer reads them from HBM again. A window over a buffer marks a fraction of its lines
(`hit_ratio`) "persisting": those stay in the set-aside part of L2 (`set_aside`, per context, at
most the device's max persisting size) while every other access - the weights, streamed once a
step - shares the rest. The window is set on each kernel node of a captured graph before it is
instantiated (`set_graph_window`; torch's `CUDAGraph(keep_graph=True)` keeps the cudaGraph_t for
it), and `graph_windows` reads them back. Ampere (sm_80) and later; `supported()` says whether
this device has it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38
_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
_CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
_CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
_CU_KERNEL_NODE_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1  # CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW
_CU_GRAPH_NODE_TYPE_KERNEL = 0
ACCESS_NORMAL, ACCESS_STREAMING, ACCESS_PERSISTING = 0, 1, 2  # CUaccessProperty


class _Window(ctypes.Structure):  # CUaccessPolicyWindow
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hit_ratio", ctypes.c_float),
                ("hit_prop", ctypes.c_int), ("miss_prop", ctypes.c_int)]


class _AttrValue(ctypes.Union):  # CUkernelNodeAttrValue (CUlaunchAttributeValue: 64 bytes)
    _fields_ = [("window", _Window), ("pad", ctypes.c_char * 64)]


@dataclass(frozen=True)
class L2Limits:
    l2_bytes: int  # the L2's size
    max_persisting_bytes: int  # the largest set-aside the device allows (0: no persisting L2)
    max_window_bytes: int  # the largest access-policy window


_DRIVER: ctypes.CDLL | None = None


def _driver() -> ctypes.CDLL:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = ctypes.CDLL("libcuda.so.1")
    return _DRIVER


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"l2_persist: {call} failed with CUresult {result}")


def _attribute(attribute: int, device: torch.device) -> int:
    value = ctypes.c_int()
    _check(_driver().cuDeviceGetAttribute(ctypes.byref(value), attribute, device.index or 0), "cuDeviceGetAttribute")
    return value.value


def supported(device: torch.device) -> bool:
    """Whether `device` is a CUDA device with persisting L2 (compute capability 8.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def limits(device: torch.device) -> L2Limits:
    """The L2's size, the largest set-aside and the largest window of CUDA `device`."""
    torch.cuda.init()
    return L2Limits(_attribute(_CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, device),
                    _attribute(_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, device),
                    _attribute(_CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE, device))


def set_aside(device: torch.device, nbytes: int) -> int:
    """Set aside up to `nbytes` of L2 for persisting lines in this process's context on `device`
    (clamped to the device's maximum); returns the bytes set aside. 0 gives it all back."""
    nbytes = max(0, min(nbytes, limits(device).max_persisting_bytes))
    with torch.cuda.device(device):
        _check(_driver().cuCtxSetLimit(_CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(nbytes)), "cuCtxSetLimit")
    return nbytes


def hit_ratio(window_bytes: int, persisting_bytes: int) -> float:
    """The fraction of a window's lines to mark persisting so that they fit the set-aside: all of
    them when it fits, else the fraction that does (a larger one makes the lines evict each other)."""
    if window_bytes <= 0 or persisting_bytes <= 0:
        return 0.0
    return min(1.0, persisting_bytes / window_bytes)


def _window_value(buffer: torch.Tensor, persisting_bytes: int, miss_prop: int) -> tuple[_AttrValue, float]:
    if not buffer.is_contiguous():
        raise ValueError("l2_persist: the buffer must be contiguous")
    nbytes = min(buffer.numel() * buffer.element_size(), limits(buffer.device).max_window_bytes)
    ratio = hit_ratio(nbytes, persisting_bytes)
    value = _AttrValue()
    value.window = _Window(buffer.data_ptr(), nbytes, ratio, ACCESS_PERSISTING, miss_prop)
    return value, ratio


def _kernel_nodes(graph: int) -> list[ctypes.c_void_p]:
    """The kernel nodes of CUgraph `graph` (a cudaGraph_t: torch's `CUDAGraph.raw_cuda_graph()`)."""
    drv = _driver()
    count = ctypes.c_size_t()
    _check(drv.cuGraphGetNodes(ctypes.c_void_p(graph), None, ctypes.byref(count)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * count.value)()
    _check(drv.cuGraphGetNodes(ctypes.c_void_p(graph), nodes, ctypes.byref(count)), "cuGraphGetNodes")
    kernels = []
    for node in nodes[: count.value]:
        kind = ctypes.c_int()
        _check(drv.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)), "cuGraphNodeGetType")
        if kind.value == _CU_GRAPH_NODE_TYPE_KERNEL:
            kernels.append(ctypes.c_void_p(node))
    return kernels


def set_graph_window(graph: int, buffer: torch.Tensor, persisting_bytes: int,
                     miss_prop: int = ACCESS_STREAMING) -> float:
    """Give every kernel node of the captured, not yet instantiated CUgraph `graph` an access-policy
    window over `buffer` (contiguous; its first max-window bytes): a hit ratio of its lines, what
    fits `persisting_bytes` of set-aside, persist in L2 across the graph's kernels; the rest get
    `miss_prop`. Returns the hit ratio (0.0: nothing to persist, nodes left as they were)."""
    value, ratio = _window_value(buffer, persisting_bytes, miss_prop)
    if ratio == 0.0:
        return 0.0
    for node in _kernel_nodes(graph):
        _check(_driver().cuGraphKernelNodeSetAttribute(node, _CU_KERNEL_NODE_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                                       ctypes.byref(value)), "cuGraphKernelNodeSetAttribute")
    return ratio


def graph_windows(graph: int) -> list[tuple[int, int, float]]:
    """(base address, bytes, hit ratio) of each kernel node's access-policy window in CUgraph `graph`."""
    out = []
    for node in _kernel_nodes(graph):
        value = _AttrValue()
        _check(_driver().cuGraphKernelNodeGetAttribute(node, _CU_KERNEL_NODE_ATTRIBUTE_ACCESS_POLICY_WINDOW,
                                                       ctypes.byref(value)), "cuGraphKernelNodeGetAttribute")
        out.append((value.window.base_ptr or 0, value.window.num_bytes, value.window.hit_ratio))
    return out


def reset(device: torch.device) -> None:
    """Return every persisting line of this context on `device` to normal (cuCtxResetPersistingL2Cache)."""
    with torch.cuda.device(device):
        _check(_driver().cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache")
