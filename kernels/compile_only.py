"""Compile the Triton kernels for a GPU that is not here, and read what ptxas made of them.

`compiled_for(capability)` is a context in which every Triton launch compiles the kernel for that
NVIDIA architecture (sm_90 = the H200 by default) exactly as a launch on that card would - same
argument specialization (16-byte alignment, ints equal to 1), same constexprs and options - and
records it instead of running it. The launchers can then be called with CPU tensors on a machine
with no GPU: their outputs are left untouched. For each launch it records the registers per
thread, the stack frame (bytes of local memory per thread: register spills), and the shared
memory, from the cubin (`cuobjdump -res-usage`), which is what decides how many programs fit on
an SM. `bench/compile_report.py` prints them for every launch configuration the kernels use.

Needs Triton's JIT, not its interpreter: run it in a process without `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

__all__ = ["Compiled", "compiled_for"]


@dataclass(frozen=True)
class Compiled:
    kernel: str
    options: dict[str, Any]  # num_warps, num_stages, maxnreg, launch_pdl, ...
    constexprs: dict[str, Any]
    grid: tuple[int, ...]
    registers: int  # per thread
    stack_bytes: int  # local memory per thread: spills (0 when everything fits in registers)
    shared_bytes: int  # dynamic (Triton's) + static
    async_copies: int  # cp.async instructions in the PTX: loads the pipeliner made asynchronous

    @property
    def threads(self) -> int:
        return 32 * int(self.options["num_warps"])

    def programs_per_sm(self, registers_per_sm: int = 65536, shared_per_sm: int = 228 * 1024,
                        max_threads: int = 2048) -> int:
        """How many programs of this launch fit on one SM at once (Hopper's limits by default:
        64K registers, 228 KB shared memory, 2,048 threads); registers are allocated per warp in
        units of 256."""
        per_warp = -(-max(self.registers, 1) * 32 // 256) * 256
        by_regs = registers_per_sm // (per_warp * int(self.options["num_warps"]))
        by_shared = shared_per_sm // self.shared_bytes if self.shared_bytes else by_regs
        return max(0, min(by_regs, by_shared, max_threads // self.threads, 32))


@contextlib.contextmanager
def compiled_for(capability: int = 90, warp_size: int = 32) -> Iterator[list[Compiled]]:
    """Within the context, Triton launches compile for `capability` and are recorded, not run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiled_for needs Triton's compiler: unset TRITON_INTERPRET (the interpreter "
                           "replaced every kernel when Triton was imported)")
    target = GPUTarget("cuda", capability, warp_size)
    backend = make_backend(target)
    records: list[Compiled] = []
    binders: dict[Any, Any] = {}
    original = jit.JITFunction.run

    def run(self: jit.JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, _ = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, None)
        compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        registers, stack = _resource_usage(compiled.asm["cubin"])
        names = [p.name for p in self.params]
        records.append(Compiled(
            kernel=self.__name__,
            options={k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg", "launch_pdl",
                                                                "launch_cooperative_grid")}
            | {"num_warps": options.num_warps, "num_stages": options.num_stages},
            constexprs={names[path[0]]: value for path, value in constexprs.items() if len(path) == 1},
            grid=tuple(grid(bound_args) if callable(grid) else grid),
            registers=registers, stack_bytes=stack, shared_bytes=int(compiled.metadata.shared),
            async_copies=compiled.asm["ptx"].count("cp.async.c")))

    jit.JITFunction.run = run
    try:
        yield records
    finally:
        jit.JITFunction.run = original


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the cubin's one kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's answer: {text[-300:]!r}")
    return int(found.group(1)), int(found.group(2))
