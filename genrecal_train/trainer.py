"""The `train-student` recipe: stage 1 aligns the Recalibrator (student frozen), stage 2 distils into the
student through it, stage 3 fine-tunes the student alone (DESIGN.md, "Stages").

`Trainer(cfg, stage).run()` trains one stage from its checkpoint (or from scratch), saving the student
(`save_pretrained`), the Recalibrator (safetensors + JSON) and the trainer state for exact resume.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genrecal_cache.chat import Renderer, compatible_runs, load_processor
from genrecal_cache.config import flag
from genrecal_cache.errors import ConfigError, StoreError
from genrecal_cache.faults import fault_point
from genrecal_cache.inspect import format_verify, load_head, verify
from genrecal_cache.store import TeacherStore

from . import dist
from .data import Prefetcher, StoreStream, StreamState, TrainSample, block_order
from .losses import student_loss, teacher_head_loss
from .recalibrator import ANSWER_INPUTS, Recalibrator, RecalibratorConfig
from .sequence import (
    SlotSample,
    build_batch,
    student_question_inputs,
    teacher_answer_inputs,
    teacher_question_inputs,
)

VISION_MODULES = ("vision_tower", "vision_model", "visual", "image_encoder")
STAGES = ("1", "2", "3", "all")
LOSS_KEYS = ("student", "recal", "reg", "ar", "kl", "reg_ar", "reg_kl")


@dataclass
class TrainConfig:
    """Train a student from a teacher store: stage 1 aligns the Recalibrator (student frozen), stage 2 distils
    through it, stage 3 fine-tunes the student alone. Re-run with --resume to continue after a crash."""

    store: Path = flag("Teacher store written by cache-teacher.")
    student: str = flag("Student model directory (transformers), loaded with its processor.")
    output: Path = flag("Output directory; each stage writes output/stage<k>/ (student, recalibrator, state).")
    stage: str = flag("Stage to run: 1 (align the Recalibrator), 2 (distil), 3 (fine-tune) or all.", "all")
    epochs: int = flag("Epochs over the store per stage.", 1)
    max_steps: int | None = flag("Stop each stage after this many optimizer steps.", None)
    batch_size: int = flag("Samples per micro-batch.", 8)
    grad_accum: int = flag("Micro-batches per optimizer step (the loss is normalised over all of them).", 1)
    lr: float = flag("Peak learning rate of each stage.", 1e-4)
    lr_end: float = flag("Learning rate at the end of each stage (linear decay).", 1e-5)
    warmup_steps: int = flag("Linear warm-up steps at the start of each stage.", 0)
    weight_decay: float = flag("AdamW weight decay.", 0.0)
    max_grad_norm: float = flag("Clip the gradient norm to this (0: no clipping).", 1.0)
    temperature: float = flag("Distillation temperature T: both sides' logits / T, the KL times T^2.", 1.0)
    ce_weight: float = flag("Weight of L_ar, the Recalibrator's CE against the teacher's targets.", 1.0)
    kl_weight: float = flag("Weight of L_kl, the KL from the teacher's distribution.", 1.0)
    student_weight: float = flag("Weight of L_s, the student's own CE (stages 2 and 3).", 1.0)
    answer_inputs: str = flag("What the Recalibrator's answer slots receive: features (the paper) or embeddings "
                              "(no copying shortcut).", "features")
    new_positions: bool = flag("Fresh rotary positions over the Recalibrator sequence (off: no positions, the "
                               "paper's ablation).", True)
    regularizer: bool = flag("The teacher-only regularizer path (needs a store with question features).", True)
    freeze_recalibrator: bool = flag("Stage 2: keep the Recalibrator fixed (as the paper's figure shows).", False)
    train_vision: bool = flag("Also train the student's vision tower (frozen by default).", False)
    recalibrator_layers: int = flag("Decoder blocks in the Recalibrator.", 2)
    recalibrator: Path | None = flag("Stage-1 output to start stage 2 from (default: output/stage1).", None)
    gradient_checkpointing: bool = flag("Recompute the student's activations in backward to save memory.", False)
    block_size: int = flag("Samples per block of the shuffle (consecutive samples are read together).", 64)
    heldout_fraction: float = flag("Fraction of samples (by id) held out for the student-reliance check.", 0.05)
    reliance_every: int = flag("Run the student-reliance check every this many steps (0: never).", 200)
    save_every: int = flag("Save a resumable checkpoint every this many steps.", 200)
    prefetch: bool = flag("Prepare the next batches in a background thread while the current one trains "
                          "(with --num-workers 0).", True)
    num_workers: int = flag("DataLoader worker processes per rank that read and render blocks of samples (0: "
                            "the main process, with --prefetch in a thread). The batches are the same either way.",
                            0)
    fsdp: bool = flag("Under torchrun, shard the student's decoder layers and the Recalibrator across ranks "
                      "(FSDP2) instead of replicating them (DDP).", False)
    log_every: int = flag("Write metrics every this many steps.", 10)
    resume: bool = flag("Continue each stage from its last checkpoint, exactly.", False)
    verify_store: bool = flag("Read the whole store through its checksums before training (without it, only the "
                              "checks that cost no array reads; damaged chunks still stop training when read).",
                              False)
    seed: int = flag("Seed for data order and initialisation.", 0)
    device: str = flag("auto, cpu, cuda, cuda:1, ...", "auto")
    impl: str = flag("Kernel paths: auto (Triton on CUDA), chunked or naive.", "auto")
    progress: bool = flag("Show a progress bar.", True)
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        self.store, self.output = Path(self.store), Path(self.output)
        if self.recalibrator is not None:
            self.recalibrator = Path(self.recalibrator)
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.answer_inputs not in ANSWER_INPUTS:
            raise ConfigError(f"--answer-inputs must be one of {', '.join(ANSWER_INPUTS)}, got {self.answer_inputs!r}")
        for name in ("epochs", "batch_size", "grad_accum", "recalibrator_layers", "save_every", "log_every",
                     "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ConfigError("--fsdp shards the models across processes, and this is one process: launch with "
                              "`torchrun --nproc-per-node N -m genrecal_train.cli ...` (N >= 2), or drop --fsdp")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def stages(self) -> list[int]:
        return [1, 2, 3] if self.stage == "all" else [int(self.stage)]


def _tensorboard(path: Path) -> Any:
    """A TensorBoard writer when tensorboard is installed, else None (metrics.jsonl has everything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def is_heldout(sample_id: str, fraction: float) -> bool:
    return zlib.crc32(sample_id.encode()) % 10_000 < fraction * 10_000


def trains_on(sample_id: str, heldout_fraction: float) -> bool:
    """Not held out (a plain function: the stream's filter is pickled into DataLoader workers)."""
    return not is_heldout(sample_id, heldout_fraction)


def vision_parameter_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(f".{m}." in f".{n}" for m in VISION_MODULES)}


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`: final -> final.old, tmp -> final, drop final.old (see `_committed`)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _committed(final: Path) -> Path:
    """`final`, or `final.old` when a crash fell between `_commit_dir`'s two renames."""
    old = final.with_name(final.name + ".old")
    return old if not final.exists() and old.exists() else final


class Trainer:
    """One stage of GenRecal: setup, run, save; resumable at any saved step."""

    def __init__(self, cfg: TrainConfig, stage: int, student_from: str | None = None):
        self.cfg, self.stage = cfg, stage
        self.dir = cfg.output / f"stage{stage}"
        self.ckpt = self.dir / "checkpoint"
        saved = _committed(self.ckpt)  # where the last checkpoint is read from
        self.rank, self.world, local = dist.init(torch.device(cfg.device).type)
        self.main = self.rank == 0
        self.device = torch.device(f"cuda:{local}" if cfg.device == "cuda" and self.world > 1 else cfg.device)
        # fp32 master weights everywhere; on GPU the forward runs under bf16 autocast (and the frozen teacher
        # head is kept in bf16), on CPU everything is fp32.
        self.amp = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.amp else torch.float32  # compute dtype
        torch.manual_seed(cfg.seed)
        self.store = TeacherStore(cfg.store)
        if len(self.store) == 0:
            raise StoreError(f"{cfg.store} has no committed samples; run cache-teacher first")
        report = verify(self.store, full=cfg.verify_store)  # never train on a damaged store
        if not report.ok:
            raise StoreError(f"{cfg.store} is damaged; not training on it.\n{format_verify(report)}\n"
                             "Re-create the damaged part with cache-teacher (or restore it from a copy).")
        self.head = load_head(self.store)
        self.head.weight = self.head.weight.to(self.device, self.dtype)
        if self.head.bias is not None:
            self.head.bias = self.head.bias.to(self.device, self.dtype)
        self.embed = self.store.head("embed").to(self.device) if cfg.answer_inputs == "embeddings" else None
        self.use_regularizer = cfg.regularizer and self.store.meta["question_features"] and stage in (1, 2)
        resume = cfg.resume and (saved / "trainer_state.pt").exists()
        self._load_student(str(saved / "student") if resume else (student_from or cfg.student))
        self.recal = self._load_recalibrator(saved if resume else None) if stage in (1, 2) else None
        if stage == 1 and not resume and self.main:  # the starting point, for inspect-cache --plot (before FSDP)
            self.recal.save(self.dir / "init" / "recalibrator")
        self.student.train()  # from_pretrained returns eval mode (no dropout, no gradient checkpointing)
        if self.recal is not None:
            self.recal.train()
        self._freeze()
        # Every pass over the student or the Recalibrator runs as `self.model(fn, ...)`, through DDP or FSDP under
        # torchrun; `self.models` is the bare root (state dicts, optimizer state), its keys those of one process.
        self.models = dist.Models(student=self.student, recal=self.recal)
        # Second names of tied weights (the LM head tied to the embeddings): save_pretrained leaves them out.
        self._tied = ({n for n, _ in self.student.named_parameters(remove_duplicate=False)}
                      - {n for n, _ in self.student.named_parameters()})
        self.model = dist.wrap(self.models, cfg.fsdp, self._fsdp_units() if cfg.fsdp else [])
        params = [p for p in self.models.parameters() if p.requires_grad]  # after FSDP swapped in its shards
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._keep = functools.partial(trains_on, heldout_fraction=cfg.heldout_fraction)
        self.stream = StoreStream(self.store, self.renderer, cfg.batch_size, cfg.seed + stage, cfg.block_size,
                                  self.rank, self.world, keep=self._keep, num_workers=cfg.num_workers)
        self.total_steps = self._count_steps()
        # The prefetch thread renders with self.renderer; the reliance check renders in the main thread, so it
        # gets its own copy of the processor (fast tokenizers are not safe to share between threads).
        self._reliance_stream = StoreStream(self.store, Renderer(copy.deepcopy(self.processor)), 1)
        self.step = 0
        self.data_state = StreamState()
        self._last: list[TrainSample] | None = None  # a batch to re-run with weight 0 (see train_step)
        self.times: dict[str, float] | None = None  # set to {} to time the phases of each step (tools/bench_train.py)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_state(saved)
            self.data_state = self.stream.state
        self.metrics = self.tensorboard = None
        if self.main:  # one writer of metrics and checkpoints
            log = self.dir / "metrics.jsonl"
            kept = []
            if resume and log.exists():  # drop what was logged after the checkpoint: those steps run again
                kept = [ln for ln in log.read_text().splitlines() if _step_of(ln) <= self.step]
            log.write_text("".join(ln + "\n" for ln in kept))
            self.metrics = log.open("a")
            self.tensorboard = _tensorboard(self.dir / "tensorboard")
        if resume:
            self._log({"stage": stage, "step": self.step, "resumed_from": self.step})

    # --- setup --------------------------------------------------------------------------------------------------

    def _load_student(self, path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        if not (Path(path) / "config.json").exists() and path.startswith((".", "/")):
            raise ConfigError(f"--student {path}: no model there (expected a directory with config.json)")
        self.processor = load_processor(path)
        multimodal = hasattr(self.processor, "image_processor")
        cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        self.student = cls.from_pretrained(path, dtype=torch.float32).to(self.device)
        if self.cfg.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        self.renderer = Renderer(self.processor)

    def _load_recalibrator(self, saved: Path | None) -> Recalibrator:
        """From the checkpoint being resumed (`saved`), from stage 1 (stage 2), or new (stage 1)."""
        teacher = self.store.meta["teacher"]
        if saved is not None:
            recal = Recalibrator.load(saved / "recalibrator")
        elif self.stage == 2:
            own = self.cfg.output / "stage1" / "final"  # --stage all: the Recalibrator stage 1 just trained
            src = own if self.cfg.stage == "all" else (self.cfg.recalibrator or own)
            if (src / "recalibrator" / "recalibrator.json").exists():
                src = src / "recalibrator"
            if not (src / "recalibrator.json").exists():
                raise ConfigError(f"stage 2 needs a stage-1 Recalibrator; none at {src} (run `train-student "
                                  f"--stage 1` first, or pass --recalibrator DIR)")
            recal = Recalibrator.load(src)
        else:
            recal = Recalibrator(RecalibratorConfig.from_student(
                self.student.config, teacher["hidden_size"], num_layers=self.cfg.recalibrator_layers,
                new_positions=self.cfg.new_positions, answer_inputs=self.cfg.answer_inputs,
                teacher={k: teacher.get(k) for k in ("name_or_path", "vocab_size", "head_digest")}))
        trained_for = recal.cfg.teacher
        for key in ("vocab_size", "head_digest"):
            if trained_for.get(key) is not None and trained_for[key] != teacher.get(key):
                raise ConfigError(f"the Recalibrator was trained for teacher {trained_for.get('name_or_path')!r} "
                                  f"({key} differs from this store's teacher {teacher.get('name_or_path')!r}); "
                                  "train stage 1 on this store")
        if recal.cfg.answer_inputs != self.cfg.answer_inputs:
            raise ConfigError(f"the Recalibrator was trained with --answer-inputs {recal.cfg.answer_inputs}, this "
                              f"run asks for {self.cfg.answer_inputs}: pass --answer-inputs "
                              f"{recal.cfg.answer_inputs}")
        if recal.cfg.teacher_hidden != teacher["hidden_size"]:
            raise ConfigError(f"the Recalibrator maps to width {recal.cfg.teacher_hidden}, the store's teacher "
                              f"has {teacher['hidden_size']}: it was trained for another teacher")
        text = self.student.config.get_text_config()
        if recal.cfg.student_hidden != text.hidden_size:
            raise ConfigError(f"the Recalibrator expects student width {recal.cfg.student_hidden}, the student has "
                              f"{text.hidden_size}")
        return recal.to(self.device, torch.float32)

    def _freeze(self) -> None:
        train_student = self.stage in (2, 3)
        frozen_vision = set() if self.cfg.train_vision else vision_parameter_names(self.student)
        for n, p in self.student.named_parameters():
            p.requires_grad_(train_student and n not in frozen_vision)
        if self.recal is not None:
            for p in self.recal.parameters():
                p.requires_grad_(not (self.stage == 2 and self.cfg.freeze_recalibrator))

    def _fsdp_units(self) -> list[torch.nn.Module]:
        """What FSDP shards on its own: the student's decoder layers (the blocks transformers never splits,
        `_no_split_modules`, outside the vision tower, which some batches skip) and the Recalibrator's blocks."""
        names = {n for m in self.student.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        units = [m for n, m in self.student.named_modules()
                 if type(m).__name__ in names and not any(f".{v}." in f".{n}." for v in VISION_MODULES)]
        return units + ([*self.recal.blocks, self.recal] if self.recal is not None else [])

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

    # --- one step -----------------------------------------------------------------------------------------------

    def _micro_batches(self) -> list[list[TrainSample]]:
        """The next `grad_accum` batches of this rank (fewer at the very end, none when its data is done)."""
        out = []
        for batch, state in self._batches:
            out.append(batch)
            self.data_state = state  # the position a checkpoint after this step resumes from
            if len(out) == self.cfg.grad_accum:
                break
        return out

    def _student(self, batch: list[TrainSample], n_student: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The student's final features per sample (L_i, D_s) and, in stages 2-3, its own loss L_s. Samples
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
            with torch.set_grad_enabled(self.stage in (2, 3)), self._autocast(), self.timer("student_forward"):
                hidden = self.student.base_model(**inputs, use_cache=False).last_hidden_state  # (b, L, D_s)
            if j >= real:  # a padding run: in the graph with weight 0, so its backward gathers the layers too
                if hidden.requires_grad:
                    loss = loss + 0.0 * hidden.sum()
                continue
            feats += [hidden[i, : len(r.input_ids)] for i, r in enumerate(group)]
            if self.stage in (2, 3):
                mask = torch.stack([torch.nn.functional.pad(torch.from_numpy(r.label_mask),
                                                            (0, hidden.shape[1] - len(r.input_ids)))
                                    for r in group]).to(self.device).bool()  # (b, L)
                part = student_loss(self.student.get_output_embeddings(), hidden, inputs["input_ids"], mask,
                                    n_student)
                loss = part if loss is None else loss + part
        return feats, loss

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _forward(self, batch: list[TrainSample], n_teacher: int, n_student: int) -> dict[str, torch.Tensor]:
        with self._autocast():
            return self._losses(batch, n_teacher, n_student)

    def _losses(self, batch: list[TrainSample], n_teacher: int, n_student: int) -> dict[str, torch.Tensor]:
        feats, s_loss = self._student(batch, n_student)
        parts: dict[str, torch.Tensor] = {}
        if s_loss is not None:
            parts["student"] = self.cfg.student_weight * s_loss
        if self.recal is None:
            return parts
        z = torch.cat([s.teacher.features for s in batch]).to(self.device)  # (A, D_l)
        targets = torch.cat([s.teacher.targets for s in batch]).to(self.device)  # (A,)
        answers = [teacher_answer_inputs(s.teacher, self.cfg.answer_inputs, self.embed) for s in batch]
        slots = [SlotSample(student_question_inputs(feats[i], s.student.segments), answers[i])
                 for i, s in enumerate(batch)]
        d_s = feats[0].shape[-1]
        kw = dict(head=self.head, normalizer=n_teacher, temperature=self.cfg.temperature,
                  ce_weight=self.cfg.ce_weight, kl_weight=self.cfg.kl_weight, impl=self.cfg.impl)
        # (loss key, its CE/KL keys, slots): the student path, and the teacher-only regularizer when it is on
        paths = [("recal", "ar", "kl", slots)]
        if self.use_regularizer:
            reg = [SlotSample([q.to(self.device) for q in teacher_question_inputs(s.teacher)],
                              [a.to(self.device) for a in answers[i]], teacher_question=True)
                   for i, s in enumerate(batch)]
            paths.append(("reg", "reg_ar", "reg_kl", reg))
        for key, ce_key, kl_key, path in paths:
            with self.timer("recalibrator"):
                r = self.recal(build_batch(path, d_s, self.device, self.dtype), impl=self.cfg.impl)
            with self.timer("loss"):
                out = teacher_head_loss(r, z, targets, **kw)
            parts[key], parts[ce_key], parts[kl_key] = out.loss, out.ce, out.kl
        return parts

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

    def _filler(self) -> list[TrainSample]:
        """A batch for a pass with weight 0: the last one trained on, or (a rank that never had data) the first
        sample of the store the student can take."""
        if self._last is None:
            for p in self.store.parts:
                for t in p.read(0, min(len(p), self.cfg.block_size)):
                    item = self._reliance_stream._pair(t)
                    if item is not None:
                        self._last = [item]
                        return self._last
            raise StoreError(f"the student can take none of the first samples of {self.cfg.store}")
        return self._last

    def train_step(self, micro: list[list[TrainSample]], passes: int | None = None) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (possibly none, when its data ran out first).
        Every rank runs `passes` (the most any rank has) forward/backward passes, the missing ones on a batch with
        weight 0: DDP reduces gradients in the backward of the last pass, FSDP gathers parameters in every pass,
        so a rank that skipped one would leave the others waiting."""
        passes = len(micro) if passes is None else passes
        counts = torch.tensor([sum(len(s.teacher.targets) for b in micro for s in b),
                               sum(int(s.student.label_mask.sum()) for b in micro for s in b)], dtype=torch.float64)
        n_teacher, n_student = (max(1, int(c)) for c in dist.sum_(counts.to(self.device)).tolist())
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i in range(passes):
            real = i < len(micro)
            batch = micro[i] if real else self._filler()
            with dist.no_sync(self.model, sync=i == passes - 1):
                parts = self.model(self._forward, batch, n_teacher, n_student)
                loss = sum(v for k, v in parts.items() if k in ("student", "recal", "reg"))
                if loss.requires_grad:
                    with self.timer("backward"):
                        (loss if real else loss * 0.0).backward()
            if real:
                self._last = batch
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach())
        params = [p for group in self.opt.param_groups for p in group["params"]]
        for p in params:  # a parameter this step did not reach has gradient 0, whatever the number of ranks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.active():  # the same keys on every rank, also on one whose data ran out
            vals = torch.tensor([totals.get(k, 0.0) for k in LOSS_KEYS], dtype=torch.float64, device=self.device)
            totals = {k: v for k, v in zip(LOSS_KEYS, dist.sum_(vals).tolist()) if k in totals or v != 0.0}
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
        self.opt.step()
        self.step += 1
        totals["loss"] = sum(totals.get(k, 0.0) for k in ("student", "recal", "reg"))
        totals["tokens"] = n_teacher
        return totals

    # --- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train the stage to its end; returns the directory of the final student/Recalibrator."""
        cfg = self.cfg
        self._batches = self.stream.batches(cfg.epochs)
        if cfg.prefetch and cfg.num_workers == 0:  # workers already prepare blocks ahead
            self._batches = Prefetcher(self._batches)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.progress and self.main),
                   dynamic_ncols=True,
                   desc=f"train-student stage {self.stage}")
        t0, tokens = time.perf_counter(), 0
        while self.cfg.max_steps is None or self.step < self.cfg.max_steps:
            with self.timer("data_wait"):
                micro = self._micro_batches()
            passes = dist.max_(len(micro), self.device)
            if passes == 0:  # every rank is out of data
                break
            m = self.train_step(micro, passes)
            tokens += m["tokens"]
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            if self.step % cfg.log_every == 0:
                self._log({"stage": self.stage, "step": self.step, "lr": self.lr_at(self.step - 1),
                           "tokens_per_s": round(rate, 1), "student_rejects": len(self.stream.rejected),
                           **{k: round(v, 6) for k, v in m.items()}})
            if cfg.reliance_every and self.recal is not None and self.step % cfg.reliance_every == 0:
                self._log({"stage": self.stage, "step": self.step, **self.student_reliance()})
            if self.step % cfg.save_every == 0:
                self.save_checkpoint()
            fault_point(f"train-step:{self.stage}:{self.step}")
        bar.close()
        if hasattr(self._batches, "close"):
            self._batches.close()  # stops DataLoader workers now, not when garbage collected
        final = self.dir / "final"
        if self.recal is not None:
            self._log({"stage": self.stage, "step": self.step, **self.student_reliance()})
        states = self._model_states()
        if self.main:
            tmp = _atomic_dir(final)
            self._save_models(tmp, states)
            _commit_dir(tmp, final)
        self.save_checkpoint()
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return final

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"stage{self.stage}/{k}", v, record.get("step", 0))

    @torch.no_grad()
    def student_reliance(self, limit: int = 64) -> dict[str, float]:
        """First-answer-token accuracy of the Recalibrator on held-out samples with each sample's own student
        features and with another sample's: equal accuracies mean the student's features carry no signal. Every
        rank runs it (under FSDP each forward gathers parameters from all ranks)."""
        return self.model(self._reliance, limit)

    def _reliance(self, limit: int) -> dict[str, float]:
        samples = []
        for p in self.store.parts:
            for i, sid in enumerate(p.samples.column("sample_id").to_pylist()):
                if is_heldout(sid, self.cfg.heldout_fraction) and len(samples) < limit:
                    item = self._reliance_stream._pair(p.read(i, i + 1)[0])
                    if item is not None:
                        samples.append(item)
        if len(samples) < 2:
            return {"reliance_samples": len(samples)}
        self.student.eval()
        self.recal.eval()
        stage, self.stage = self.stage, 1  # features only, no student loss
        feats, _ = self._student(samples, 1)
        self.stage = stage
        accs = {}
        for name, shift in (("own", 0), ("shuffled", 1)):
            correct = total = 0
            for i, s in enumerate(samples):
                j = (i + shift) % len(samples)
                q = student_question_inputs(feats[j], samples[j].student.segments)[:1]  # the first answer only
                slot = SlotSample(q, [teacher_answer_inputs(s.teacher, self.cfg.answer_inputs, self.embed)[0]])
                with self._autocast():
                    r = self.recal(build_batch([slot], feats[j].shape[-1], self.device, self.dtype),
                                   impl=self.cfg.impl)
                pred = self.head.logits(r[:1]).argmax(-1)
                correct += int(pred.item() == s.teacher.targets[0].item())
                total += 1
            accs[name] = correct / total
        self.student.train()
        self.recal.train()
        return {"reliance_own_acc": accs["own"], "reliance_shuffled_acc": accs["shuffled"],
                "reliance_samples": len(samples)}

    # --- checkpoints --------------------------------------------------------------------------------------------

    def _model_states(self) -> dict[str, dict[str, torch.Tensor] | None]:
        """Under FSDP, the student's and the Recalibrator's full state dicts gathered on rank 0 (every rank must
        call it); without, None for each (the modules hold every weight: they are saved as they are)."""
        if not self.cfg.fsdp:
            return {"student": None, "recal": None}
        full = dist.full_state_dict(self.models)
        return {name: {k[len(name) + 1 :]: v for k, v in full.items()
                       if k.startswith(name + ".") and k[len(name) + 1 :] not in self._tied}
                for name in ("student", "recal")}

    def _save_models(self, out: Path, states: dict[str, dict[str, torch.Tensor] | None]) -> None:
        self.student.save_pretrained(out / "student", state_dict=states["student"])
        self.processor.save_pretrained(out / "student")
        if self.recal is not None:
            self.recal.save(out / "recalibrator", states["recal"])

    def save_checkpoint(self) -> None:
        """Student, Recalibrator, optimizer, every rank's data position and the RNG state, written atomically
        (by rank 0; every rank must call it)."""
        streams = dist.gather(asdict(self.data_state))
        states, optimizer = self._model_states(), dist.optimizer_state(self.models, self.opt)
        if self.main:
            self._write_checkpoint(streams, states, optimizer)
        dist.barrier()  # nobody moves on (or reads it) before it is complete

    def _write_checkpoint(self, streams: list[dict], states: dict[str, dict[str, torch.Tensor]],
                          optimizer: dict[str, Any]) -> None:
        tmp = _atomic_dir(self.ckpt)
        self._save_models(tmp, states)
        torch.save({
            "step": self.step, "total_steps": self.total_steps, "stage": self.stage, "world": self.world,
            "streams": streams, "optimizer": optimizer,  # keyed by parameter name, with or without FSDP
            "torch_rng": torch.get_rng_state(),
            "config": {k: str(v) for k, v in asdict(self.cfg).items() if k != "command"},
        }, tmp / "trainer_state.pt")
        _commit_dir(tmp, self.ckpt)

    def _load_state(self, saved: Path) -> None:
        state = torch.load(saved / "trainer_state.pt", weights_only=True, map_location="cpu")
        if state["world"] != self.world:
            raise ConfigError(f"the checkpoint in {self.ckpt} was written by {state['world']} processes, this run "
                              f"has {self.world}: resume with the same number of processes")
        self.step, self.total_steps = state["step"], state["total_steps"]
        self.stream.state = StreamState(**state["streams"][self.rank])
        dist.load_optimizer_state(self.models, self.opt, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])


def train(cfg: TrainConfig) -> list[Path]:
    """Run the configured stages in order; stage k+1 starts from stage k's student."""
    outs, student_from = [], None
    for stage in cfg.stages:
        if stage > 1 and student_from is None and cfg.stage == "all":
            student_from = str(cfg.output / f"stage{stage - 1}" / "final" / "student")
        if stage == 3 and cfg.stage == "3":
            prev = cfg.output / "stage2" / "final" / "student"
            student_from = str(prev) if prev.exists() else None
        final = Trainer(cfg, stage, student_from).run()
        outs.append(final)
        student_from = str(final / "student")
    return outs

