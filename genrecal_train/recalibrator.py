"""The Recalibrator (docs/DESIGN.md): ProjPre (teacher inputs only) -> N causal decoder blocks of the student's
shape -> ProjPost -> LayerNorm, over a sequence built so that each scored slot predicts the *next* teacher token.

Per answer segment of n teacher tokens the sequence holds the student's question features (every student
position since the previous answer; the last one predicts the first answer token), then n-1 answer slots
ProjPre(x_1 .. x_{n-1}). `answer_inputs="features"` feeds the teacher's final features at those positions (the
paper's choice; every answer slot after the first then already holds what it is scored against), and
`"embeddings"` the teacher's input embeddings of the previous answer tokens (no copying shortcut).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genrecal_cache.core.config import Choice
from genrecal_kernels import proj_post_ln, proj_pre


class AnswerInputs(Choice):
    """What the Recalibrator's answer slots receive (docs/DESIGN.md, "Recalibrator sequence")."""

    features = "features"  # the teacher's final features of the answer tokens (the paper's)
    embeddings = "embeddings"  # the teacher's input embeddings of the previous answer tokens (no copying)


@dataclass
class RecalibratorConfig:
    """Shapes of the Recalibrator: the body has the student's width, heads and FFN; the ends the teacher's."""

    student_hidden: int
    teacher_hidden: int
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    new_positions: bool = True  # fresh rotary positions 0..L-1 over the Recalibrator sequence; False: none
    answer_inputs: AnswerInputs = AnswerInputs.features  # saved as its plain string in recalibrator.json
    init_std: float = 0.02
    dropout: float = 0.0  # on attention weights and each block's residual branches while training (0: the paper's)
    teacher: dict = field(default_factory=dict)  # the store's teacher it was trained for (name, vocab, head digest)

    def __post_init__(self) -> None:
        self.answer_inputs = AnswerInputs(self.answer_inputs)  # the member, also when loaded as a string
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_student(cls, student_config: Any, teacher_hidden: int, **overrides: Any) -> RecalibratorConfig:
        """Take the body's shape from a transformers (text) config of the student."""
        c = student_config.get_text_config() if hasattr(student_config, "get_text_config") else student_config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        kw = dict(
            student_hidden=c.hidden_size, teacher_hidden=teacher_hidden, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=getattr(c, "intermediate_size", 4 * c.hidden_size),
            rms_norm_eps=getattr(c, "rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
            init_std=getattr(c, "initializer_range", 0.02),
        )
        kw.update(overrides)
        return cls(**kw)


class _Block(nn.Module):
    """A pre-norm causal decoder block (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP)."""

    def __init__(self, cfg: RecalibratorConfig):
        super().__init__()
        d, h, kv, hd = cfg.student_hidden, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h, self.kv, self.hd, self.p = h, kv, hd, cfg.dropout
        self.attn_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.q = nn.Linear(d, h * hd, bias=False)
        self.k = nn.Linear(d, kv * hd, bias=False)
        self.v = nn.Linear(d, kv * hd, bias=False)
        self.o = nn.Linear(h * hd, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> torch.Tensor:
        b, L, _ = x.shape  # (B, L, D_s)
        y = self.attn_norm(x)
        q = self.q(y).view(b, L, self.h, self.hd).transpose(1, 2)  # (B, H, L, hd)
        k = self.k(y).view(b, L, self.kv, self.hd).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v(y).view(b, L, self.kv, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)  # (B, H, L, hd)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        p = self.p if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, hd)
        x = x + self._drop(self.o(att.transpose(1, 2).reshape(b, L, self.h * self.hd)), p)
        y = self.mlp_norm(x)
        return x + self._drop(self.down(F.silu(self.gate(y)) * self.up(y)), p)

    @staticmethod
    def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p) if p > 0 else x  # p 0 draws nothing from the generator


def _rope(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]  # (L, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (L, hd)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class RecalBatch:
    """A batch of Recalibrator sequences, right-padded.

    `student` (B, L, D_s) holds the student (or regularizer) question slots, zero elsewhere; `teacher_inputs`
    (S, D_l) the answer-slot inputs in storage dtype, placed at `answer_index` (S,) of the flattened (B*L)
    slots; `scored_index` (A,) the flattened slots whose outputs are scored, in the order of the targets."""

    student: torch.Tensor
    teacher_inputs: torch.Tensor
    answer_index: torch.Tensor
    scored_index: torch.Tensor
    lengths: torch.Tensor  # (B,)


class Recalibrator(nn.Module):
    """Maps student question features + teacher answer inputs into the teacher's feature space.

    Initialisation: every Linear weight ~ N(0, init_std) with zero biases, except the residual output
    projections (attention `o`, MLP `down`), whose std is divided by sqrt(2 * num_layers) as in GPT-2, so the
    body starts near the identity; RMSNorm and the final LayerNorm start at weight 1, bias 0."""

    def __init__(self, cfg: RecalibratorConfig):
        super().__init__()
        self.cfg = cfg
        self.proj_pre = nn.Linear(cfg.teacher_hidden, cfg.student_hidden)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.proj_post = nn.Linear(cfg.student_hidden, cfg.teacher_hidden)
        self.out_norm = nn.LayerNorm(cfg.teacher_hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                scale = math.sqrt(2 * self.cfg.num_layers) if name.endswith((".o", ".down")) else 1.0
                nn.init.normal_(m.weight, std=std / scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()

    def forward(self, batch: RecalBatch, impl: str = "auto") -> torch.Tensor:
        """Outputs at the scored slots, (A, D_l), after ProjPost and LayerNorm."""
        b, L, d = batch.student.shape
        slots = batch.student.reshape(b * L, d)  # (B*L, D_s)
        if len(batch.answer_index):
            answers = proj_pre(batch.teacher_inputs, self.proj_pre.weight, self.proj_pre.bias, impl=impl)
            slots = slots.index_put((batch.answer_index,), answers.to(slots.dtype))  # (B*L, D_s)
        x = slots.view(b, L, d)
        valid = torch.arange(L, device=x.device)[None, :] < batch.lengths[:, None]  # (B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, L, L): causal, keys within the sequence
        mask = mask | torch.eye(L, dtype=torch.bool, device=x.device)  # padded queries see themselves: no NaN
        rope = _rope(L, self.cfg.head_dim, self.cfg.rope_theta, x.device, x.dtype) if self.cfg.new_positions else None
        for block in self.blocks:
            x = block(x, mask, rope)
        h = x.reshape(b * L, d)[batch.scored_index]  # (A, D_s)
        return proj_post_ln(h, self.proj_post.weight, self.proj_post.bias, self.out_norm.weight,
                            self.out_norm.bias, self.out_norm.eps, impl=impl)

    def save(self, out: Path | str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """`recalibrator.safetensors` + `recalibrator.json` (the config) in `out`; `state_dict` in place of the
        module's own (a full one gathered from FSDP shards)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / "recalibrator.safetensors")
        config = {**asdict(self.cfg), "answer_inputs": self.cfg.answer_inputs.value}  # a plain string on disk
        (out / "recalibrator.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: Path | str) -> Recalibrator:
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(RecalibratorConfig(**json.loads((path / "recalibrator.json").read_text())))
        model.load_state_dict(load_file(path / "recalibrator.safetensors"))
        return model
