"""The arithmetic a run does, for the speed tables (issue 33): FLOPs counted op by op while it runs.

`FlopCounter` is a TorchDispatchMode that adds up the FLOPs of every matrix product, convolution and fused
attention run inside it, by `torch.utils.flop_counter`'s own formulas (two FLOPs per multiply-add, so a
matrix product of (m, k) and (k, n) is 2mkn), the formula for the CPU's fused attention added: PyTorch's
`FlopCounterMode` has formulas for the CUDA kernels of `scaled_dot_product_attention` but not for
`_scaled_dot_product_flash_attention_for_cpu`, so on a CPU it counts a UNet's self-attention as nothing, which
is the part of a large stage's cost that grows with its tokens squared. `flop_counter_mode()` is FlopCounterMode
with that formula, the reference the counter agrees with (tests/test_bench.py); the counter itself skips
FlopCounterMode's per-module bookkeeping and its decompositions, which cost several times as much per op and
count nothing more in a UNet or a VAE.

Everything else (normalisations, activations, element-wise ops, resizing) is not counted, as FlopCounterMode
does not: what is counted is the arithmetic a dense-matrix peak bounds.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count, shape_wrapper

__all__ = ["FlopCounter", "StageFlops", "flop_counter_mode", "matmul_gflops"]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention: (batch, heads, queries, dim) @ keys^T, then @ values, as the CUDA kernels'."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
FORMULAS = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in EXTRA_FORMULAS.items()}}


def flop_counter_mode() -> FlopCounterMode:
    """torch's FlopCounterMode (not printing) with the CPU attention's formula: the reference."""
    return FlopCounterMode(display=False, custom_mapping=dict(EXTRA_FORMULAS))


class FlopCounter(TorchDispatchMode):
    """`with FlopCounter() as counter: ...` -> counter.total, the FLOPs of the ops run inside (see the module)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class StageFlops:
    """An `on_stage` callback for `api.generate` under a FlopCounter: the FLOPs of each stage, from the end of the
    stage before to its own end (its upsampling, its denoising and, for a stage that is decoded, the decode; the
    prompts' encoding falls in the first stage)."""

    def __init__(self, counter: FlopCounter):
        self.counter = counter
        self.marks: list[int] = []

    def __call__(self, index: int, stage) -> None:
        self.marks.append(self.counter.total)

    def per_stage(self, total: int | None = None) -> list[int]:
        """FLOPs per stage; `total` (the counter's at the end of the call) puts what came after the last stage's
        report (nothing, for the library's methods) into the last stage."""
        marks = list(self.marks)
        if marks and total is not None:
            marks[-1] = total
        return [b - a for a, b in zip([0, *marks], marks)]


def matmul_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """The machine's dense matrix-product rate in GFLOP/s (a square torch.mm, median of `repeats`, after a warm-up),
    with the threads torch has: what a FLOP-bound run would reach."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9
