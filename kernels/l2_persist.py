"""Keep one buffer in L2 across the kernels of a CUDA graph: the persisting-L2 set-aside and an
access-policy window, through the CUDA driver API (ctypes on libcuda; torch exposes neither).

Every cross layer of a CLSA decode step reads the same selected K/V rows (56 MiB at 128K, B = 7),
and 189 MB of weights stream through L2 between two layers' reads, so under L2's normal policy
each layer reads them from HBM again. A window over a buffer marks a fraction of its lines
(`hit_ratio`) "persisting": those stay in the set-aside part of L2 (`set_aside`, per context, at
most the device's max persisting size) while every other access - the weights, streamed once a
step - shares the rest. The window is a stream attribute; a CUDA graph captured on that stream
bakes it into each kernel node, so it is set before capture and cleared after
(`access_window`). Ampere (sm_80) and later; `supported()` says whether this device has it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38
_CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108
_CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE = 109
_CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
_CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW = 1
ACCESS_NORMAL, ACCESS_STREAMING, ACCESS_PERSISTING = 0, 1, 2  # CUaccessProperty


class _Window(ctypes.Structure):  # CUaccessPolicyWindow
    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t), ("hit_ratio", ctypes.c_float),
                ("hit_prop", ctypes.c_int), ("miss_prop", ctypes.c_int)]


class _AttrValue(ctypes.Union):  # CUstreamAttrValue (CUlaunchAttributeValue: 64 bytes)
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


def _set_window(stream: torch.cuda.Stream, base: int, nbytes: int, ratio: float, miss_prop: int) -> None:
    value = _AttrValue()
    value.window = _Window(base, nbytes, ratio, ACCESS_PERSISTING if nbytes else ACCESS_NORMAL,
                           miss_prop if nbytes else ACCESS_NORMAL)
    _check(_driver().cuStreamSetAttribute(ctypes.c_void_p(stream.cuda_stream),
                                          _CU_STREAM_ATTRIBUTE_ACCESS_POLICY_WINDOW, ctypes.byref(value)),
           "cuStreamSetAttribute")


@contextmanager
def access_window(stream: torch.cuda.Stream, buffer: torch.Tensor, persisting_bytes: int,
                  miss_prop: int = ACCESS_STREAMING) -> Iterator[float]:
    """Within the context, kernels launched (or captured into a graph) on `stream` keep the
    lines of `buffer` (contiguous; its first max-window bytes) in L2's set-aside of
    `persisting_bytes`: yields the hit ratio used (0.0: nothing marked). The stream's window is
    cleared on exit; a graph captured inside keeps it in its kernel nodes."""
    if not buffer.is_contiguous():
        raise ValueError("l2_persist.access_window: the buffer must be contiguous")
    nbytes = min(buffer.numel() * buffer.element_size(), limits(buffer.device).max_window_bytes)
    ratio = hit_ratio(nbytes, persisting_bytes)
    if ratio == 0.0:
        yield 0.0
        return
    _set_window(stream, buffer.data_ptr(), nbytes, ratio, miss_prop)
    try:
        yield ratio
    finally:
        _set_window(stream, 0, 0, 0.0, ACCESS_NORMAL)


def reset(device: torch.device) -> None:
    """Return every persisting line of this context on `device` to normal (cuCtxResetPersistingL2Cache)."""
    with torch.cuda.device(device):
        _check(_driver().cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache")
