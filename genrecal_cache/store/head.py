"""The teacher's LM head as the store keeps it: logits and top-k log-probabilities from cached features.

Works in row chunks so that no (N, V) tensor larger than `chunk` rows ever exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class TeacherHead:
    """logits = softcap(scale * (z @ W.T + b)); `softcap` c maps x to c * tanh(x / c)."""

    weight: torch.Tensor  # (V, D)
    bias: torch.Tensor | None = None  # (V,)
    logit_scale: float | None = None
    softcap: float | None = None

    vocab_chunk: int = 16384  # a half-precision head is converted to fp32 this many rows at a time

    def logits(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, V), fp32
        z = z.float()
        if self.weight.dtype == torch.float32:
            out = z @ self.weight.T
        else:  # never an fp32 copy of the whole head (5 GB for a 72B teacher's)
            out = torch.cat([z @ w.float().T for w in self.weight.split(self.vocab_chunk)], dim=-1)
        if self.bias is not None:
            out = out + self.bias.float()
        if self.logit_scale is not None:
            out = out * self.logit_scale
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out

    def topk(self, z: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids (N, k) and their log-probabilities (N, k) under the full-vocabulary softmax."""
        ids, lps = [], []
        for s in range(0, z.shape[0], chunk):
            logp = torch.log_softmax(self.logits(z[s : s + chunk]), dim=-1)  # (n, V)
            v, i = logp.topk(k, dim=-1)
            ids.append(i)
            lps.append(v)
        if not ids:
            return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        return torch.cat(ids), torch.cat(lps)

    def log_probs(self, z: torch.Tensor, chunk: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
        """Float64 log-probabilities under the full-vocabulary softmax, `chunk` rows at a time: (rows, (n, V))."""
        for s in range(0, z.shape[0], chunk):
            yield slice(s, s + chunk), torch.log_softmax(self.logits(z[s : s + chunk]).double(), dim=-1)
