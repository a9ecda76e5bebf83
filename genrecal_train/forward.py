"""What one training pass computes, for every method: the student's final features (and its own loss L_s),
GenRecal's Recalibrator losses on the frozen teacher head (the student path and the teacher-only regularizer),
or the ULD baseline's loss. The trainer runs it inside its DDP/FSDP root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from genrecal_cache.core.models import head_scaling
from genrecal_cache.data.render import Renderer, compatible_runs
from genrecal_cache.store.head import TeacherHead

from . import dist
from .alignment import answer_pairs
from .config import TrainConfig, ULDSource
from .data import TrainSample
from .losses import student_loss, teacher_head_loss, uld_student_loss
from .recalibrator import Recalibrator
from .sequence import SlotSample, build_batch, student_question_inputs, teacher_answer_inputs, teacher_question_inputs
from .stages import StagePlan


class Counts(NamedTuple):
    """What a pass's loss parts are divided by: sums over a step's samples on every rank (or over the validation
    set), so each part is a per-token mean however the samples are split into passes and ranks."""

    teacher: int  # label tokens (ULD: aligned answer pairs): the teacher-side losses
    student: int  # the student's own label tokens: L_s
    regularizer: int  # label tokens of the samples whose question features the store keeps: the regularizer's,
    # so its scale does not change with --question-features-fraction

    def at_least_one(self) -> Counts:
        return Counts(*(max(1, int(c)) for c in self))


class StepForward:
    """The losses of one pass of the stage `plan` describes: `forward(batch, counts)` -> {part: loss}.

    `use_regularizer`: the teacher-only path is on (the plan's, when the store has question features);
    `timer(name)`: a context that times a phase (the trainer's)."""

    def __init__(self, cfg: TrainConfig, plan: StagePlan, model: torch.nn.Module, recal: Recalibrator | None,
                 renderer: Renderer, head: TeacherHead, embed: torch.Tensor | None, device: torch.device,
                 use_regularizer: bool, teacher_tok: Any, timer: Callable[[str], contextlib.AbstractContextManager]):
        self.cfg, self.plan, self.model, self.recal, self.renderer = cfg, plan, model, recal, renderer
        self.head, self.embed, self.device = head, embed, device
        self.use_regularizer, self.teacher_tok, self.timer = use_regularizer, teacher_tok, timer
        self.amp = device.type == "cuda"  # bf16 autocast on GPU; fp32 on CPU
        self.dtype = torch.bfloat16 if self.amp else torch.float32  # compute dtype
        self.pairs: dict[str, tuple[list[int], list[int]]] = {}  # ULD: this step's aligned positions, by sample
        self.student_scaling = head_scaling(model.config)  # the student's own logit scale and softcap

    def counts(self, samples: list[TrainSample]) -> Counts:
        """These samples' share of `Counts` (sum them over ranks, or over the validation set)."""
        labels = [len(s.teacher.targets) for s in samples]
        return Counts(sum(len(self.aligned(s)[0]) for s in samples) if self.plan.uld else sum(labels),
                      sum(int(s.student.label_mask.sum()) for s in samples),
                      sum(n for n, s in zip(labels, samples) if s.teacher.question_features is not None))

    def student(self, batch: list[TrainSample], n_student: int, with_loss: bool
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The student's final features per sample (L_i, D_s) and, `with_loss`, its own loss L_s. Samples
        whose inputs do not batch together (e.g. different image layouts) run in separate forwards."""
        feats: list[torch.Tensor] = []
        loss = None
        runs = compatible_runs([s.student for s in batch])
        real = len(runs)
        if self.cfg.fsdp:  # each run gathers every decoder layer from all ranks: all ranks run as many
            runs += [runs[0][:1]] * (dist.max_(real, self.device) - real)
        for j, run in enumerate(runs):
            group = [batch[i].student for i in run]
            inputs = {k: v.to(self.device) for k, v in self.renderer.collate(group).items()}
            grad = with_loss and torch.is_grad_enabled()  # none under an outer no_grad: validation's losses
            with torch.set_grad_enabled(grad), self.autocast(), self.timer("student_forward"):
                hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state  # (b, L, D_s)
            if j >= real:  # a padding run: in the graph with weight 0, so its backward gathers the layers too
                if hidden.requires_grad:
                    loss = loss + 0.0 * hidden.sum()
                continue
            feats += [hidden[i, : len(r.input_ids)] for i, r in enumerate(group)]
            if with_loss:
                mask = torch.stack([torch.nn.functional.pad(torch.from_numpy(r.label_mask),
                                                            (0, hidden.shape[1] - len(r.input_ids)))
                                    for r in group]).to(self.device).bool()  # (b, L)
                part = student_loss(self.model.get_output_embeddings(), hidden, inputs["input_ids"], mask,
                                    n_student, *self.student_scaling)
                loss = part if loss is None else loss + part
        return feats, loss

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def __call__(self, batch: list[TrainSample], counts: Counts) -> dict[str, torch.Tensor]:
        """The loss parts of one pass (run inside the DDP/FSDP root as `model(forward, ...)`), each divided by its
        `counts`."""
        with self.autocast():
            return self.losses(batch, counts)

    def losses(self, batch: list[TrainSample], counts: Counts) -> dict[str, torch.Tensor]:
        feats, s_loss = self.student(batch, counts.student, with_loss=self.plan.trains_student)
        parts: dict[str, torch.Tensor] = {}
        if s_loss is not None:
            parts["student"] = self.cfg.student_weight * s_loss
        if self.plan.uld:
            with self.timer("loss"):
                parts["uld"] = self.cfg.uld_weight * self.uld_loss(batch, feats, counts.teacher)
        if self.recal is None:
            return parts
        answers = [teacher_answer_inputs(s.teacher, self.cfg.answer_inputs, self.embed) for s in batch]
        slots = [SlotSample(student_question_inputs(feats[i], s.student.segments), answers[i])
                 for i, s in enumerate(batch)]
        # (loss key, its CE/KL keys, samples, slots, normalizer): the student path, and the teacher-only regularizer
        # when it is on, over the samples whose question features the store keeps (all, unless it was written with
        # --question-features-fraction)
        paths = [("recal", "ar", "kl", list(range(len(batch))), slots, counts.teacher)]
        if self.use_regularizer:
            kept = [i for i, s in enumerate(batch) if s.teacher.question_features is not None]
            reg = [SlotSample([q.to(self.device) for q in teacher_question_inputs(batch[i].teacher)],
                              [a.to(self.device) for a in answers[i]], teacher_question=True) for i in kept]
            paths.append(("reg", "reg_ar", "reg_kl", kept, reg, counts.regularizer))
        d_s = feats[0].shape[-1]
        for key, ce_key, kl_key, kept, path, normalizer in paths:
            if not kept:  # no sample of this pass has question features: the regularizer adds nothing
                parts[key] = parts[ce_key] = parts[kl_key] = torch.zeros((), device=self.device)
                continue
            z = torch.cat([batch[i].teacher.features for i in kept]).to(self.device)  # (A, D_l)
            targets = torch.cat([batch[i].teacher.targets for i in kept]).to(self.device)  # (A,)
            with self.timer("recalibrator"):
                r = self.recal(build_batch(path, d_s, self.device, self.dtype), impl=self.cfg.impl)
            with self.timer("loss"):
                out = teacher_head_loss(r, z, targets, head=self.head, normalizer=normalizer,
                                        temperature=self.cfg.temperature, ce_weight=self.cfg.ce_weight,
                                        kl_weight=self.cfg.kl_weight, impl=self.cfg.impl)
            parts[key], parts[ce_key], parts[kl_key] = out.loss, out.ce, out.kl
        return parts

    def aligned(self, sample: TrainSample) -> tuple[list[int], list[int]]:
        """--method uld: the student positions and teacher rows compared (alignment.py), once per step."""
        sid = sample.teacher.sample_id
        if sid not in self.pairs:
            self.pairs[sid] = answer_pairs(sample, self.cfg.uld_align.value, self.renderer.tokenizer,
                                            self.teacher_tok)
        return self.pairs[sid]

    def uld_loss(self, batch: list[TrainSample], feats: list[torch.Tensor], normalizer: int) -> torch.Tensor:
        """ULD between the student's distributions at its aligned answer positions and the teacher's (its full
        head(features), or its stored top-k), summed and divided by the global count of aligned pairs."""
        pairs = [self.aligned(s) for s in batch]
        h = torch.cat([feats[i][torch.tensor(pos, dtype=torch.long, device=self.device)]
                       for i, (pos, _) in enumerate(pairs)])  # (n, D_s)
        rows = [torch.tensor(r, dtype=torch.long) for _, r in pairs]
        if self.cfg.uld_source == ULDSource.full:
            teacher = {"teacher_z": torch.cat([s.teacher.features[r] for s, r in zip(batch, rows)]).to(self.device)}
        else:
            teacher = {"teacher_topk_logprobs": torch.cat([s.teacher.topk_logprobs[r] for s, r in zip(batch, rows)]
                                                          ).to(self.device)}
        scale, softcap = self.student_scaling
        return uld_student_loss(h, self.model.get_output_embeddings(), self.head, normalizer, **teacher,
                                logit_scale=scale, softcap=softcap)
