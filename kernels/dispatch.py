"""Kernel dispatch, decided once at import: whether triton is there (and interpreting), the `impl` choices
(`Impl`) with the one rule for when Triton runs, and capability flags of this torch. No state changes afterwards."""

from __future__ import annotations

import os
from enum import Enum

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU machines without triton use the PyTorch paths
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels run in the interpreter (CPU tensors)


class Impl(str, Enum):
    """Which kernel path computes the Recalibrator's projections and the teacher-head loss (`train-student --impl`).
    Compares equal to its string value and prints as it: every entry point takes either."""

    auto = "auto"  # Triton on CUDA when installed, else chunked PyTorch
    triton = "triton"
    chunked = "chunked"
    naive = "naive"  # plain autograd; the reference

    def __str__(self) -> str:
        return self.value


IMPLS = tuple(i.value for i in Impl)  # ("auto", "triton", "chunked", "naive")


def _probe_mm_out_dtype() -> bool:
    """Whether this torch has `torch.mm(a, b, out_dtype=torch.float32)` for bf16 operands (fp32 products of
    half-precision inputs). Probed on the meta device: the CPU backend has no such kernel even where CUDA has
    it, and the probe must not initialise CUDA."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):  # older torch: no out_dtype argument, or no such overload
        return False


MM_OUT_DTYPE = _probe_mm_out_dtype()


def check_impl(impl: Impl | str) -> None:
    """A ValueError naming the choices unless `impl` is one of `IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def use_triton(impl: Impl | str, x: torch.Tensor) -> bool:
    """Whether `impl` runs the Triton kernels for inputs like `x`: "triton" always, "auto" on CUDA tensors when
    triton is installed, "chunked" and "naive" never."""
    check_impl(impl)
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    return impl == "triton" or (impl == "auto" and HAS_TRITON and x.is_cuda)
