"""What a cache job appends to a store: one teacher-forced sample (`SampleRecord`) as the rows of each array,
and the check that refuses a sample with NaN or infinite teacher values (`NonFiniteError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genrecal_cache.core.errors import RejectError

from .dtypes import SCALE, encode_features
from .format import carries_question_features, question_fraction


@dataclass
class SampleRecord:
    """One teacher-forced sample ready to append: token-axis arrays plus its table row."""

    sample_id: str
    source_row: int
    messages: list[dict]
    images: list[Any]  # dataset.ImageRef
    token_ids: np.ndarray  # (L,) int
    label_mask: np.ndarray  # (L,) bool
    features: torch.Tensor  # (A, D) at the label positions
    targets: np.ndarray  # (A,)
    segments: list[dict]
    topk_ids: torch.Tensor | None = None  # (A, K)
    topk_logprobs: torch.Tensor | None = None  # (A, K)
    question_features: torch.Tensor | None = None  # (P, D) at every other position (kept for `carries_question`)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (A, D)
    answers_generated: bool = False
    answer_truncated: bool = False

    def carries_question(self, meta: dict[str, Any]) -> bool:
        """Whether the store keeps this sample's question features."""
        return bool(meta["question_features"]) and carries_question_features(self.sample_id, question_fraction(meta))

    def rows(self, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        fd = meta["feature_dtype"]
        out = {
            "token_ids": np.asarray(self.token_ids, dtype=np.int32),
            "label_mask": np.asarray(self.label_mask, dtype=np.uint8),
            "targets": np.asarray(self.targets, dtype=np.int32),
        }

        def put(name: str, x: torch.Tensor) -> None:  # fp8: the e4m3 bits and each row's scale beside them
            out[name], scale = encode_features(x, fd)
            if scale is not None:
                out[name + SCALE] = scale

        put("features", self.features)
        if meta["topk"]:
            out["topk_ids"] = self.topk_ids.to(torch.int32).numpy()
            out["topk_logprobs"] = self.topk_logprobs.to(torch.float32).numpy()
        if meta["question_features"]:  # none (0 rows) for a sample outside --question-features-fraction's subset
            put("question_features", self.question_features if self.carries_question(meta) else
                self.question_features[:0])
        for layer in meta.get("layers", []):
            put(f"layers/{layer}", self.layers[layer])
        return out


class NonFiniteError(RejectError):
    """A sample whose teacher values are NaN or infinite (`reason` says which and where); nothing of it is added."""


_CHECKED = ("features", "question_features", "topk_logprobs")  # and layers/*: float rows as stored


def non_finite(rows: dict[str, np.ndarray]) -> str | None:
    """Which of a sample's float values, as stored, are NaN or infinite, and in which rows; None when all are
    finite."""
    found = []
    for name, a in rows.items():
        if name.removesuffix(SCALE) not in _CHECKED and not name.startswith("layers/"):
            continue
        # bf16 is kept as its bits: NaN and inf are the ones whose exponent bits are all set; fp8 (e4m3fn) has no
        # inf, its NaN is S.1111.111. No float copy.
        bad = ((a & 0x7F80) == 0x7F80 if a.dtype == np.uint16 else (a & 0x7F) == 0x7F if a.dtype == np.uint8
               else ~np.isfinite(a))
        if bad.any():
            where = np.flatnonzero(bad.reshape(len(a), -1).any(1)).tolist()
            at = ", ".join(map(str, where[:8])) + (", ..." if len(where) > 8 else "")
            unit = "question" if name.startswith("question_features") else "label"
            found.append(f"{name}: {int(bad.sum())} NaN/inf values at {unit} positions [{at}] of {len(a)}")
    return "; ".join(found) or None
