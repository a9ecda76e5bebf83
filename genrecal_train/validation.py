"""Validation during training (`--eval-every`, and at the end of every stage): the stage's losses on held-out
samples, without gradient, and in stages that train the student its greedy answers scored as eval-student scores
them; logged as `val_*` records. `--keep-best` keeps the best student and Recalibrator in `stage<k>/best/`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.data.rows import stored_sample
from genrecal_cache.store.reader import TeacherSample

from . import checkpoint, dist, saving
from .config import TrainConfig
from .data import TrainSample, is_heldout, located_pairs, pair
from .evaluate import greedy_answer, prompt_and_gold, score
from .forward import Counts
from .stages import StagePlan

SCORES = ("val_exact_match", "val_normalised_match")  # higher is better; every other metric is a loss


def metrics_of(plan: StagePlan, regularizer: bool, answers: bool) -> list[str]:
    """The validation metrics stage `plan` computes: `val_loss`, its parts (the keys a training step reports; the
    regularizer's with `regularizer`) and, where the stage trains the student and `answers` (--eval-samples > 0),
    the answer scores."""
    parts = ["student"] if plan.trains_student else []
    if plan.uld:
        parts.append("uld")
    if plan.uses_recalibrator:
        parts += ["recal", "ar", "kl", *(("reg", "reg_ar", "reg_kl") if regularizer else ())]
    return ["val_loss", *(f"val_{p}" for p in parts), *(SCORES if plan.trains_student and answers else ())]


def announce(cfg: TrainConfig, main: bool) -> None:
    """Before any stage: --keep-best must name a metric some stage of this command computes; --heldout-fraction 0
    says (once) that nothing is validated."""
    if cfg.keep_best is not None:
        computed = {m: None for k in cfg.stages for m in metrics_of(StagePlan.of(cfg, k), True, cfg.eval_samples > 0)}
        if cfg.keep_best.value not in computed:
            raise ConfigError(f"--keep-best {cfg.keep_best}: no stage this command trains computes it (--method "
                              f"{cfg.method}, stage {', '.join(map(str, cfg.stages))}); choose one of "
                              f"{', '.join(computed)}")
    if cfg.heldout_fraction == 0 and main:
        print("train-student: --heldout-fraction 0: training on every sample; nothing is held out, so there is no "
              "validation (--eval-every) and no student-reliance check", flush=True)


class Validation:
    """A stage's validation. `trainer` (a `Trainer`, set up) provides the models, the forward pass and the metrics
    log; `run()` validates at the current step (every rank calls it: under FSDP each forward gathers parameters
    from all ranks). Its `state()` (the step last validated, the best so far) goes into the checkpoint."""

    def __init__(self, trainer: Any):
        self.t, cfg, plan = trainer, trainer.cfg, trainer.plan
        self.on = cfg.heldout_fraction > 0
        self.metrics = metrics_of(plan, trainer.use_regularizer, cfg.eval_samples > 0)
        wanted = cfg.keep_best.value if cfg.keep_best is not None else None
        self.keep = wanted if wanted in self.metrics else None  # the metric --keep-best ranks by in this stage
        self.at: int | None = None  # the step last validated: a stage resumed at its end does not validate again
        self.best: dict[str, Any] | None = None  # {metric, value, step, basis}
        self._found: list[tuple[int, int, Counts]] | None = None  # (part, row, its loss counts)
        if wanted and not self.keep and trainer.main:
            print(f"train-student stage {plan.stage}: --keep-best {wanted}: this stage does not compute it (it "
                  f"computes {', '.join(self.metrics)}), so it keeps no best/", flush=True)

    # --- what a checkpoint keeps --------------------------------------------------------------------------------

    def basis(self) -> dict[str, int]:
        """What the kept metric is measured on: a best value measured on other samples is not comparable."""
        c = self.t.cfg
        return ({"eval_samples": c.eval_samples, "eval_max_new_tokens": c.eval_max_new_tokens} if self.keep in SCORES
                else {"eval_loss_samples": c.eval_loss_samples})

    def state(self) -> dict[str, Any]:
        return {"at": self.at, "best": self.best}

    def load(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's validation state (absent in checkpoints written before validation existed)."""
        if not state:
            return
        self.at, best = state["at"], state["best"]
        if best and best["metric"] == self.keep and best["basis"] == self.basis():
            self.best = best
        elif best and self.keep and self.t.main:
            print(f"train-student stage {self.t.stage}: the best/ kept so far ({best['metric']} {best['value']:.6g} "
                  f"at step {best['step']}, on {best['basis']}) is not measured as --keep-best {self.keep} on "
                  f"{self.basis()} is: the next validation replaces it", flush=True)

    # --- validating ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Validate at the trainer's step (once per step), log the `val_*` record, keep the best."""
        t = self.t
        if not self.on or self.at == t.step:
            return
        self.at = t.step
        found = self._samples()
        if not found:
            return
        rng = checkpoint.rng_state(t.device.type == "cuda")  # validation draws nothing training would have drawn
        modes = [(m, m.training) for root in (t.student, t.recal) if root is not None for m in root.modules()]
        for m, _ in modes:
            m.training = False  # eval mode: no dropout
        try:
            with torch.no_grad():
                values = self._losses(found[: t.cfg.eval_loss_samples])
                if t.plan.trains_student and t.cfg.eval_samples:
                    values.update(t.model(self._answers, found[: t.cfg.eval_samples]))
        finally:
            for m, mode in modes:
                m.training = mode
            checkpoint.set_rng_state(rng)
            t.forward.pairs = {}
        values = dist.gather(values)[0]  # rank 0's numbers everywhere: every rank takes the same --keep-best choice
        t.metrics.log({"stage": t.stage, "step": t.step, **values})
        if t.main:
            shown = ", ".join(f"{k} {values[k]:.4g}" for k in ("val_loss", *SCORES) if k in values)
            tqdm.write(f"train-student stage {t.stage}, step {t.step}: {shown} ({values['val_samples']} held-out "
                       f"samples" + (f", {values['val_answers']} answers)" if "val_answers" in values else ")"))
        self._keep_best(values)

    def _samples(self) -> list[tuple[int, int, Counts]]:
        """Where the validation samples are: the first held-out samples (by id) the student can take, in store
        order, found once; each with the counts its losses are averaged over. They are read again at each
        validation rather than kept (with question features a sample can take megabytes)."""
        if self._found is None:
            t, cfg = self.t, self.t.cfg
            keep = functools.partial(is_heldout, fraction=cfg.heldout_fraction)
            self._found = [(k, i, t.forward.counts([s])) for k, i, s in located_pairs(
                t.store, t._renderer_copy(), keep, max(cfg.eval_loss_samples, cfg.eval_samples))]
            t.forward.pairs = {}
            if not self._found and t.main:
                print(f"train-student stage {t.stage}: no held-out sample (--heldout-fraction "
                      f"{cfg.heldout_fraction}) that the student can take: no validation in this stage", flush=True)
        return self._found

    def _teacher(self, k: int, i: int) -> TeacherSample:
        return self.t.store.parts[k].read(i, i + 1)[0]

    def _read(self, found: list[tuple[int, int, Counts]]) -> Iterator[TrainSample]:
        t = self.t
        for k, i, *_ in found:
            yield pair(self._teacher(k, i), t._renderer_copy(), t.store.path)

    def _losses(self, found: list[tuple[int, int, Counts]]) -> dict[str, float]:
        """The stage's loss parts over `found`, each divided by the whole set's counts (as a step divides by its
        batch's): the per-token averages over the held-out samples; `val_loss` is the sum the stage trains."""
        t, f, size = self.t, self.t.forward, self.t.cfg.batch_size
        counts = Counts(*map(sum, zip(Counts(0, 0, 0), *(c for _, _, c in found)))).at_least_one()
        totals: dict[str, float] = {}
        for a in range(0, len(found), size):
            f.pairs = {}
            for k, v in t.model(f, list(self._read(found[a : a + size])), counts).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        parts = {f"val_{k}": v for k, v in totals.items()}
        return {"val_loss": sum(totals.get(k, 0.0) for k in t.plan.losses), **parts, "val_samples": len(found)}

    def _answers(self, found: list[tuple[int, int, Counts]]) -> dict[str, float]:
        """The student's greedy answers to the held-out prompts, scored against their last answers (run inside the
        DDP/FSDP root: every rank answers the same prompts, each forward in step with the others')."""
        t = self.t
        renderer, synced = t._renderer_copy(), bool(t.cfg.fsdp and dist.active())
        scores = []
        for k, i, *_ in found:
            try:
                prompt, gold = prompt_and_gold(stored_sample(self._teacher(k, i), t.store.path), renderer)
            except (RejectError, ValueError, OSError):
                continue
            with t.forward.autocast():
                pred = greedy_answer(t.student, renderer, prompt, t.device, t.cfg.eval_max_new_tokens, synced)
            scores.append(score(pred, gold))
        if not scores:
            return {"val_answers": 0}
        return {"val_exact_match": sum(s["exact"] for s in scores) / len(scores),
                "val_normalised_match": sum(s["normalised"] for s in scores) / len(scores), "val_answers": len(scores)}

    def _keep_best(self, values: dict[str, float]) -> None:
        """Replace `best/` (atomically, as `final/`) when the kept metric is better than the best so far."""
        t = self.t
        value = values.get(self.keep) if self.keep else None
        if value is None or not math.isfinite(value):
            return
        if self.best is not None and not (value > self.best["value"] if self.keep in SCORES
                                          else value < self.best["value"]):
            return
        self.best = {"metric": self.keep, "value": value, "step": t.step, "basis": self.basis()}
        m = t.stage_models
        if m.peft is not None and t.main:  # merging removes the adapters: merge a copy, training goes on
            m = dataclasses.replace(m, peft=copy.deepcopy(m.peft))
        saving.save_final(t.dir / "best", m, t.cfg.fsdp, t.main, t.dtype, save_adapter=False)
        t.metrics.log({"stage": t.stage, "step": t.step, "best_metric": self.keep, "best_value": value})
