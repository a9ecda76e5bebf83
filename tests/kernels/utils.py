"""Comparison helpers for kernel tests: a verbose allclose and tolerances by dtype."""

from __future__ import annotations

import torch

# (atol, rtol) for results computed from inputs of this dtype, against an fp64 reference.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 3e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str) -> None:
    """Like torch.testing.assert_close, but says how many elements are off, the worst one, and any NaN/inf."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad_values = int((~torch.isfinite(a)).sum())
    assert bad_values == 0, f"{name}: {bad_values} NaN/inf values"
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    off = err > tol
    if off.any():
        worst = int(torch.argmax(err - tol))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(off.sum())}/{a.numel()} elements off (atol {atol}, rtol {rtol}); worst at {idx}: "
            f"{a.flatten()[worst].item():.6g} vs {e.flatten()[worst].item():.6g}; max abs err {err.max().item():.3g}")
