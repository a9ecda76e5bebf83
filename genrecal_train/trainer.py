"""The `train-student` recipe: stage 1 aligns the Recalibrator (student frozen), stage 2 distils into the
student through it, stage 3 fine-tunes the student alone (docs/DESIGN.md, "Stages").

`Trainer(cfg, stage).run()` trains one stage from its checkpoint (or from scratch) and saves the student
(`save_pretrained`), the Recalibrator and the trainer state for exact resume. Its parts live in their own
modules: config, stages (what a stage does), startup (checks), stage_models (what trains), data, forward, losses,
saving and checkpoint, metrics, reliance, validation, dist.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from genrecal_cache.core.config import write_config
from genrecal_cache.core.errors import StoreError
from genrecal_cache.core.faults import fault_point
from genrecal_cache.data.render import Renderer
from genrecal_cache.store.format import TOKENIZER_DIR, question_fraction

from . import checkpoint, dist, guards, identity, saving, validation
from .config import TrainConfig, ULDAlign
from .data import Prefetcher, StoreStream, StreamState, TrainSample, block_order, is_heldout, pairs, trains_on
from .forward import Counts, StepForward
from .metrics import MetricsLog
from .recalibrator import AnswerInputs
from .reliance import student_reliance
from .stage_models import setup_models
from .stages import LOSS_KEYS, StagePlan
from .startup import check_resumable, open_store
from .tracking import stage_trackers


class Trainer:
    """One stage of GenRecal: setup (here), `train_step`, `run`, `close`; resumable at any saved step.

    Everything the run starts (the prefetch thread or DataLoader workers, the metrics files) is stopped by
    `close()`, which `run()` calls on success, on error and on Ctrl-C; use the trainer as a context manager
    when driving `train_step` yourself."""

    def __init__(self, cfg: TrainConfig, stage: int | StagePlan, student_from: str | None = None):
        """Stage `stage` (its number, or its plan) of the run `cfg`, starting from `student_from` (the previous
        stage's student) or --student."""
        self.cfg, self.plan = cfg, stage if isinstance(stage, StagePlan) else StagePlan.of(cfg, stage)
        self.stage = stage = self.plan.stage
        self.dir = cfg.output / f"stage{stage}"
        self.ckpt = self.dir / "checkpoint"
        saved = checkpoint.committed(self.ckpt)  # where the last checkpoint is read from
        resume = cfg.resume and checkpoint.has_state(saved)
        self.rank, self.world, local = dist.init(torch.device(cfg.device).type)
        self.main = self.rank == 0
        self.device = torch.device(f"cuda:{local}" if cfg.device == "cuda" and self.world > 1 else cfg.device)
        # fp32 master weights for everything that trains; on GPU the forward runs under bf16 autocast (and the
        # frozen teacher head, and a LoRA student's frozen linear weights, are kept in bf16); on CPU all is fp32.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(cfg.seed)
        # A LoRA run resumes from the student it started from plus the checkpoint's adapter.
        self.lora_base = (student_from or cfg.student) if self.plan.lora else None
        state = checkpoint.read_state(saved) if resume else None
        if state is not None:
            check_resumable(state, self.ckpt, self.world, self.lora_base,
                            asdict(cfg.lora) if self.lora_base else None)
        self._open_store()
        self.identity = identity.run_identity(cfg, self.store, student_from or cfg.student)
        if state is not None:  # before loading any model: a wrong option fails in seconds
            identity.check_same_run(state, self.identity, self.ckpt)
        self._setup_models(saved if resume else None, student_from)
        self.validation = validation.Validation(self)  # --eval-every, stage ends, --keep-best
        self._keep = functools.partial(trains_on, heldout_fraction=cfg.heldout_fraction)
        self.stream = StoreStream(self.store, self.renderer, cfg.batch_size, cfg.seed + stage, cfg.block_size,
                                  self.rank, self.world, keep=self._keep, num_workers=cfg.num_workers)
        self.total_steps = self._count_steps()
        self.step, self.saved_step = 0, None  # saved_step: the step of this stage's last checkpoint
        self.data_state = StreamState()
        self._batches: Iterator[tuple[list[TrainSample], StreamState]] | None = None
        self._last: list[TrainSample] | None = None  # a batch to re-run with weight 0 (see train_step)
        self._heldout: list[TrainSample] | None = None  # the reliance check's samples, drawn once
        self.times: dict[str, float] | None = None  # set to {} to time the phases of each step (tools/bench_train.py)
        self.dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            self._load_state(state)
            self.data_state = self.stream.state
        self.metrics = MetricsLog(self.dir, stage, enabled=self.main, resumed_at=self.step if resume else None,
                                  trackers=functools.partial(stage_trackers, cfg, self.store, self.dir, stage))
        if resume:
            self.metrics.log({"stage": stage, "step": self.step, "resumed_from": self.step})

    # --- setup --------------------------------------------------------------------------------------------------

    def _open_store(self) -> None:
        """The store (checked, startup.py), its frozen teacher head and (--answer-inputs embeddings) embeddings."""
        self.store = open_store(self.cfg, self.plan)
        self.head = self.store.teacher_head()
        self.head.weight = self.head.weight.to(self.device, self.dtype)
        if self.head.bias is not None:
            self.head.bias = self.head.bias.to(self.device, self.dtype)
        embeddings = self.cfg.answer_inputs == AnswerInputs.embeddings
        self.embed = self.store.head("embed").to(self.device) if embeddings else None

    def _setup_models(self, saved: Path | None, student_from: str | None) -> None:
        """What trains (stage_models.py), and the forward pass of this stage's losses over it."""
        cfg, plan = self.cfg, self.plan
        m = self.stage_models = setup_models(cfg, plan, saved, student_from, self.store.meta["teacher"], self.device,
                                             self.dir, self.main)
        self.student, self.processor, self.recal, self.peft = m.student, m.processor, m.recal, m.peft
        self.models, self.model, self.opt = m.models, m.model, m.opt
        self.renderer = Renderer(self.processor)
        teacher_tok = None
        if plan.uld and cfg.uld_align == ULDAlign.chars:
            from transformers import AutoTokenizer

            where = self.store.tokenizer_dir() or self.store.location.join(TOKENIZER_DIR)  # a local copy if remote
            teacher_tok = AutoTokenizer.from_pretrained(str(where))
        self.use_regularizer = bool(plan.regularizer and self.store.meta["question_features"])
        fraction = question_fraction(self.store.meta)
        if self.use_regularizer and fraction < 1 and self.main:
            kept = sum(int(p.has_question_features.sum()) for p in self.store.parts)
            print(f"train-student stage {self.stage}: the regularizer trains on the {kept} of {len(self.store)} "
                  f"samples whose question features the store keeps (--question-features-fraction {fraction:g})",
                  flush=True)
        self.forward = StepForward(cfg, plan, self.student, self.recal, self.renderer, self.head, self.embed,
                                   self.device, self.use_regularizer, teacher_tok, self.timer)

    def _count_steps(self) -> int:
        """Optimizer steps of the stage, for the LR schedule: the busiest rank's kept samples per epoch
        (samples the student cannot render, found only while training, make the real count a little lower)."""
        ids = [p.samples.column("sample_id").to_pylist() for p in self.store.parts]
        per_rank = [sum(self._keep(sid) for k, a, b in block_order(self.store, self.cfg.block_size, 0, 0, r,
                                                                          self.world) for sid in ids[k][a:b])
                    for r in range(self.world)]
        per_epoch = max(1, math.ceil(max(per_rank) / (self.cfg.batch_size * self.cfg.grad_accum)))
        steps = per_epoch * self.cfg.epochs
        return min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def lr_at(self, step: int) -> float:
        """Linear warm-up to `lr`, then linear decay to `lr_end` at the stage's last step."""
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        span = max(1, self.total_steps - c.warmup_steps - 1)
        return c.lr + (c.lr_end - c.lr) * min(1.0, (step - c.warmup_steps) / span)

    # --- data ---------------------------------------------------------------------------------------------------

    def start_data(self) -> None:
        """Start the batch stream from the current position (in a prefetch thread unless workers read ahead)."""
        self._batches = self.stream.batches(self.cfg.epochs)
        if self.cfg.prefetch and self.cfg.num_workers == 0:
            self._batches = Prefetcher(self._batches)

    def next_micro_batches(self) -> list[list[TrainSample]]:
        """The next `grad_accum` batches of this rank (fewer at the very end, none when its data is done)."""
        if self._batches is None:
            self.start_data()
        out: list[list[TrainSample]] = []
        while len(out) < self.cfg.grad_accum:
            # The data path draws nothing from training's generator (a DataLoader seeds its workers from it when it
            # starts, at step 0 of a run but at the checkpoint's step of a resumed one): resume stays exact.
            with torch.random.fork_rng(devices=[]):
                item = next(self._batches, None)
            if item is None:
                break
            out.append(item[0])
            self.data_state = item[1]  # the position a checkpoint after this step resumes from
        return out

    def _filler(self) -> list[TrainSample]:
        """A batch for a pass with weight 0: the last one trained on, or (a rank that never had data) the first
        sample of the store the student can take."""
        if self._last is None:
            self._last = pairs(self.store, self._renderer_copy(), lambda sid: True, 1)
            if not self._last:
                raise StoreError(f"the student can take none of the samples of {self.cfg.store}")
        return self._last

    @functools.cache  # noqa: B019 (one per trainer, which lives as long as its run)
    def _renderer_copy(self) -> Renderer:
        """A renderer for the main thread while the prefetch thread renders with `self.renderer` (fast
        tokenizers are not safe to share between threads)."""
        return Renderer(copy.deepcopy(self.processor))

    # --- one step -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Accumulate wall time of a phase into `self.times` (synchronising the GPU, so only when asked)."""
        if self.times is None:
            yield
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def train_step(self, micro: list[list[TrainSample]], passes: int | None = None) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (possibly none, when its data ran out first).
        Every rank runs `passes` (the most any rank has) forward/backward passes, the missing ones on a batch with
        weight 0: DDP reduces gradients in the backward of the last pass, FSDP gathers parameters in every pass,
        so a rank that skipped one would leave the others waiting."""
        passes = len(micro) if passes is None else passes
        self.forward.pairs = {}
        local = torch.tensor(self.forward.counts([s for b in micro for s in b]), dtype=torch.float64)
        counts = Counts(*dist.sum_(local.to(self.device)).tolist()).at_least_one()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        bad: list[TrainSample] = []  # this rank's samples of passes whose loss is not finite
        for i in range(passes):
            real = i < len(micro)
            batch = micro[i] if real else self._filler()
            with dist.no_sync(self.model, sync=i == passes - 1):
                parts = self.model(self.forward, batch, counts)
                loss = sum(v for k, v in parts.items() if k in self.plan.losses)
                if loss.requires_grad:
                    with self.timer("backward"):
                        (loss if real else loss * 0.0).backward()
            if real:
                self._last = batch
                values = {k: float(v.detach()) for k, v in parts.items()}
                if not all(map(math.isfinite, values.values())):
                    bad += batch
                for k, v in values.items():
                    totals[k] = totals.get(k, 0.0) + v
        params = [p for group in self.opt.param_groups for p in group["params"]]
        for p in params:  # a parameter this step did not reach has gradient 0, whatever the number of ranks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flagged = float(len(bad))  # summed with the losses: every rank stops when any rank's loss is not finite
        if dist.active():  # the same keys on every rank, also on one whose data ran out
            vals = torch.tensor([*(totals.get(k, 0.0) for k in LOSS_KEYS), flagged], dtype=torch.float64,
                                device=self.device)
            *sums, flagged = dist.sum_(vals).tolist()
            totals = {k: v for k, v in zip(LOSS_KEYS, sums) if k in totals or v != 0.0}
        totals["loss"] = sum(totals.get(k, 0.0) for k in self.plan.losses)
        if flagged:
            raise guards.non_finite(self.stage, self.step + 1, "loss", totals["loss"], bad, self.cfg.store,
                                    self.saved_step)
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
            if not math.isfinite(totals["grad_norm"]):  # the same norm on every rank
                raise guards.non_finite(self.stage, self.step + 1, "gradient norm", totals["grad_norm"],
                                        [s for b in micro for s in b], self.cfg.store, self.saved_step)
        self.opt.step()
        self.step += 1
        totals["tokens"] = counts.teacher
        return totals

    # --- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train the stage to its end; returns the directory of the final student/Recalibrator. Whatever the
        run started is stopped before this returns or raises (see `close`)."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> Path:
        cfg = self.cfg
        self.start_data()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.main),
                   dynamic_ncols=True, desc=f"train-student stage {self.stage}")
        t0, tokens, wait, m = time.perf_counter(), 0, 0.0, None
        while cfg.max_steps is None or self.step < cfg.max_steps:
            waited = time.perf_counter()
            with self.timer("data_wait"):
                micro = self.next_micro_batches()
            wait += time.perf_counter() - waited
            passes = dist.max_(len(micro), self.device)
            if passes == 0:  # every rank is out of data
                break
            m = self.train_step(micro, passes)
            tokens += m["tokens"]
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            if self.step % cfg.log_every == 0:
                self._log_step(m, rate, wait / max(time.perf_counter() - t0, 1e-9))
            if cfg.reliance_every and self.plan.uses_recalibrator and self.step % cfg.reliance_every == 0:
                self.metrics.log({"stage": self.stage, "step": self.step, **self.student_reliance()})
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.validation.run()
            if self.step % cfg.save_every == 0:
                self.save_checkpoint()
            fault_point(f"train-step:{self.stage}:{self.step}")
        bar.close()
        if self.step == 0:  # no rank had a sample to train on
            raise guards.nothing_to_train(self.stage, self.store, self.stream.rejected, cfg.heldout_fraction)
        if m is not None and self.step % cfg.log_every:  # the last step, when --log-every skipped it
            self._log_step(m, rate, wait / max(time.perf_counter() - t0, 1e-9))
        self._stop_data()  # before saving: DataLoader workers and the prefetch thread hold memory
        if self.plan.uses_recalibrator and not (cfg.reliance_every and self.step % cfg.reliance_every == 0):
            self.metrics.log({"stage": self.stage, "step": self.step, **self.student_reliance()})  # not twice
        self.validation.run()  # every stage ends validated (and its best kept) before its checkpoint
        self.save_checkpoint()  # first: merging LoRA adapters removes them
        return saving.save_final(self.dir / "final", self.stage_models, cfg.fsdp, self.main, self.dtype,
                                 cfg.save_adapter)

    def _log_step(self, m: dict[str, float], rate: float, wait_share: float) -> None:
        """One metrics record of the step just taken: its losses and the run's rates so far."""
        gpu = ({"gpu_max_allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
               if self.device.type == "cuda" else {})
        self.metrics.log({"stage": self.stage, "step": self.step, "lr": self.lr_at(self.step - 1),
                          "tokens_per_s": round(rate, 1), "student_rejects": len(self.stream.rejected),
                          "data_wait_share": round(wait_share, 4), **gpu, **{k: round(v, 6) for k, v in m.items()}})

    def _stop_data(self) -> None:
        """Stop the prefetch thread (joined) or the DataLoader workers (the generator's close shuts them)."""
        batches, self._batches = self._batches, None
        if batches is not None and hasattr(batches, "close"):
            batches.close()

    def close(self) -> None:
        """Stop every thread and worker process this trainer started and close its files; safe to call twice."""
        self._stop_data()
        self.metrics.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def student_reliance(self, limit: int = 64) -> dict[str, float]:
        """The reliance check (reliance.py) on up to `limit` held-out samples. Every rank runs it (under FSDP each
        forward gathers parameters from all ranks)."""
        if self._heldout is None:
            fraction = self.cfg.heldout_fraction
            self._heldout = pairs(self.store, self._renderer_copy(), lambda sid: is_heldout(sid, fraction), limit)
        self.student.eval()
        self.recal.eval()
        try:
            f = self.forward
            return self.model(student_reliance, self._heldout, lambda batch: f.student(batch, 1, with_loss=False)[0],
                              self.recal, self.head, self.cfg.answer_inputs, self.embed, self.cfg.impl, self.device,
                              f.dtype, f.autocast)
        finally:
            self.student.train()
            self.recal.train()

    # --- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Student, Recalibrator, optimizer, every rank's data position and random generators, and the run's
        identity, written atomically (by rank 0; every rank must call it)."""
        streams, rngs = zip(*dist.gather((asdict(self.data_state), checkpoint.rng_state(self.device.type == "cuda"))))
        saving.save_checkpoint(self.ckpt, self.stage_models, self.cfg.fsdp, self.main, lambda optimizer: {
            "lora_base": self.lora_base, "lora": asdict(self.cfg.lora) if self.lora_base else None,
            "step": self.step, "total_steps": self.total_steps, "stage": self.stage, "world": self.world,
            "streams": list(streams), "rng": list(rngs),  # every rank's, in rank order
            "validation": self.validation.state(),  # the step last validated, --keep-best's best so far
            "optimizer": optimizer,  # keyed by parameter name, with or without FSDP
            "config": self.identity["config"], "identity": self.identity})  # compared on --resume (identity.py)
        self.saved_step = self.step

    def _load_state(self, state: dict) -> None:
        self.step = self.saved_step = state["step"]
        self.total_steps = state["total_steps"]
        self.stream.state = StreamState(**state["streams"][self.rank])
        dist.load_optimizer_state(self.models, self.opt, state["optimizer"])
        if "rng" in state:
            checkpoint.set_rng_state(state["rng"][self.rank])
        else:  # written before every rank's generators were saved
            torch.set_rng_state(state["torch_rng"])
        self.validation.load(state.get("validation"))


def train(cfg: TrainConfig) -> list[Path]:
    """Run the configured stages in order; stage k+1 starts from stage k's student."""
    rank, _, _ = dist.init(torch.device(cfg.device).type)
    identity.claim_output(cfg, rank == 0)  # an output holding a run: --resume or --overwrite, else refused
    validation.announce(cfg, rank == 0)
    outs, student_from = [], None
    for stage in cfg.stages:
        plan = StagePlan.of(cfg, stage)
        if plan.from_previous_student:  # stage 3 run alone: from stage 2's student when there is one
            prev = cfg.output / f"stage{stage - 1}" / "final" / "student"
            student_from = str(prev) if prev.exists() else None
            print(f"train-student stage {stage}: fine-tuning {student_from or cfg.student}" + (
                "" if student_from else f" (--student: there is no stage-{stage - 1} student at {prev})"), flush=True)
        with Trainer(cfg, plan, student_from) as trainer:
            if not outs and rank == 0:  # once the first stage accepted the options (a refused resume keeps it)
                write_config(cfg, cfg.output / "config.yaml")  # `train-student --config` of it repeats this run
            final = trainer.run()
        outs.append(final)
        student_from = str(final / "student")
    return outs
