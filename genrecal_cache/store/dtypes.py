"""How the store keeps tensors (docs/DESIGN.md, "Arrays of a part"): bf16 as its uint16 bits (Zarr has no
bfloat16), fp8 features as e4m3 bits with a float32 scale per row, and the values a reader gets back."""

from __future__ import annotations

import numpy as np
import torch

FEATURE_DTYPES = ("bfloat16", "float16", "float32")  # compute dtypes (--dtype)
FP8 = "float8_e4m3fn"  # --feature-dtype fp8: e4m3 bits, each row scaled by its amax into e4m3's range
STORED_FEATURE_DTYPES = (*FEATURE_DTYPES, FP8)
FP8_MAX = 448.0  # e4m3fn's largest finite value
SCALE = "_scale"  # suffix of the per-row scale array beside an fp8 feature array


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array the store keeps: bf16 as its uint16 bits (Zarr has no bfloat16)."""
    x = x.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage` (no copy for bf16)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def np_dtype(dtype: str) -> str:
    return {"bfloat16": "uint16", FP8: "uint8"}.get(dtype, dtype)


def encode_features(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Feature rows (R, D) as the store keeps them: `to_storage`'s array and None, or for fp8 the e4m3 bits (R, D)
    uint8 of each row divided by its scale, and the scales (R,) float32: amax / 448, so every row spans e4m3's
    range (1 for an all-zero row). A NaN or infinite value gives a non-finite scale."""
    if dtype != FP8:
        return to_storage(x, dtype), None
    x = x.detach().to("cpu", torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True) if x.numel() else x.new_ones(len(x), 1)  # (R, 1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    bits = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return bits.numpy(), scale.squeeze(-1).numpy()


def decode_features(a: np.ndarray, scale: np.ndarray | None, dtype: str) -> torch.Tensor:
    """The inverse of `encode_features`: bf16, fp16 or fp32 rows as stored; fp8 rows dequantised to float32."""
    if dtype != FP8:
        return from_storage(a, dtype)
    bits = torch.from_numpy(np.ascontiguousarray(a)).view(torch.float8_e4m3fn)
    return bits.float() * torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).unsqueeze(-1)


def stored_features(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Features exactly as a reader will get them back (the values the store's top-k are computed from)."""
    return decode_features(*encode_features(x, dtype), dtype)
