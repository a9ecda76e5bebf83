"""genrecal_kernels.dispatch: the impl choices, the one rule for when Triton runs, and flags decided at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from genrecal_kernels import dispatch, fused_linear_ce_kl
from genrecal_kernels.recal_proj import proj_pre


def test_impls_and_check_impl():
    assert dispatch.IMPLS == ("auto", "triton", "chunked", "naive")
    for impl in dispatch.IMPLS:
        dispatch.check_impl(impl)
    with pytest.raises(ValueError, match="impl must be one of .*'auto'.*'naive'.*got 'fast'"):
        dispatch.check_impl("fast")


def test_the_rule():
    cpu = torch.zeros(1)
    assert not dispatch.use_triton("chunked", cpu) and not dispatch.use_triton("naive", cpu)
    assert not dispatch.use_triton("auto", cpu)  # auto picks Triton only for CUDA tensors
    if dispatch.HAS_TRITON:
        assert dispatch.use_triton("triton", cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        dispatch.use_triton("Triton", cpu)


def test_triton_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        dispatch.use_triton("triton", torch.zeros(1))
    assert not dispatch.use_triton("auto", torch.zeros(1))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        proj_pre(torch.zeros(2, 4), torch.zeros(3, 4), impl="triton")
    x = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        fused_linear_ce_kl(x, x, torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), impl="triton")


def test_bad_impl_is_a_value_error_in_every_entry_point():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        proj_pre(x, torch.zeros(3, 4), impl="fused")
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_linear_ce_kl(x, x, torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), impl="fused")


def test_flags_are_plain_values_decided_at_import():
    assert isinstance(dispatch.HAS_TRITON, bool) and isinstance(dispatch.INTERPRET, bool)
    assert isinstance(dispatch.MM_OUT_DTYPE, bool)
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        expected = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        expected = False
    assert dispatch.MM_OUT_DTYPE == expected


def test_kernels_import_only_torch_triton_and_stdlib():
    probe = ("import sys, genrecal_kernels; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'genrecal_cache', 'genrecal_train', 'transformers', "
             "'zarr', 'vllm'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
