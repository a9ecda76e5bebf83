"""`train-student`'s options: one typed dataclass, mapped 1:1 onto typer flags, validated with messages that
name the flag.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genrecal_cache.core.config import Choice, at_least, flag, json_object, resolve_device, to_choice
from genrecal_cache.core.errors import ConfigError
from genrecal_cache.core.locations import STORAGE_OPTIONS_HELP, parse_storage_options, store_path
from genrecal_kernels import Impl

from .lora import LoraSpec
from .recalibrator import AnswerInputs
from .tracking import parse_report_to


class Stage(Choice):
    one = "1"  # align the Recalibrator, student frozen
    two = "2"  # distil into the student through the Recalibrator
    three = "3"  # fine-tune the student alone
    all = "all"  # 1, 2 and 3 in sequence


class Method(Choice):
    """How the student learns from the store; every method ends with the same stage-3 fine-tune."""

    genrecal = "genrecal"  # stages 1-3: align the Recalibrator, distil through it, fine-tune
    uld = "uld"  # stage 2 distils with Universal Logit Distillation (no Recalibrator), then stage 3
    sft = "sft"  # stage 3 alone: SFT on the store's answers (the fair baseline)


class ULDSource(Choice):
    full = "full"  # head(features): the teacher's exact full-vocabulary distribution
    topk = "topk"  # the stored top-k probabilities, zero elsewhere


class ULDAlign(Choice):
    index = "index"  # the j-th answer token of each side, up to the shorter answer (as ULD does)
    chars = "chars"  # each student answer token with the teacher token covering its first character


class BestMetric(Choice):
    """What --keep-best ranks checkpoints by: a validation loss (lower is better) or answer score (higher)."""

    val_loss = "val_loss"  # the stage's loss, as it trains
    val_student = "val_student"  # its parts (those of the stage: stages 2-3, 1-2, --method uld's stage 2, ...)
    val_recal = "val_recal"
    val_reg = "val_reg"
    val_uld = "val_uld"
    val_ar = "val_ar"
    val_kl = "val_kl"
    val_reg_ar = "val_reg_ar"
    val_reg_kl = "val_reg_kl"
    val_exact_match = "val_exact_match"  # the student's greedy answers, scored as eval-student scores (stages 2-3)
    val_normalised_match = "val_normalised_match"


STAGES_OF = {"genrecal": [1, 2, 3], "uld": [2, 3], "sft": [3]}


@dataclass
class TrainConfig:
    """Train a student from a teacher store: stage 1 aligns the Recalibrator (student frozen), stage 2 distils
    through it, stage 3 fine-tunes the student alone. Re-run with --resume to continue after a crash."""

    store: str = flag("Teacher store written by cache-teacher: a folder, or an fsspec URL (s3://bucket/prefix) of "
                      "a copy on an object store.")
    student: str = flag("Student model directory (transformers), loaded with its processor.")
    output: Path = flag("Output directory; each stage writes output/stage<k>/ (student, recalibrator, state).")
    method: Method = flag("genrecal (stages 1-3), uld (Universal Logit Distillation in stage 2, then stage 3) or sft "
                          "(stage 3 only: SFT on the store's answers), all from the same store.", Method.genrecal)
    stage: Stage = flag("Stage to run: 1 (align the Recalibrator), 2 (distil), 3 (fine-tune) or all (the method's "
                        "stages).", Stage.all)
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
    uld_weight: float = flag("--method uld: weight of the ULD loss beside the student's own CE.", 1.0)
    uld_source: ULDSource = flag("--method uld: the teacher's distribution: full (head(features), exact) or topk "
                                 "(the stored top-k).", ULDSource.full)
    uld_align: ULDAlign = flag("--method uld: pair answer positions by token index (ULD's way) or by character "
                               "offsets of the answer text.", ULDAlign.index)
    answer_inputs: AnswerInputs = flag("What the Recalibrator's answer slots receive: features (the paper) or "
                                       "embeddings (no copying shortcut).", AnswerInputs.features)
    new_positions: bool = flag("Fresh rotary positions over the Recalibrator sequence (off: no positions, the "
                               "paper's ablation).", True)
    regularizer: bool = flag("The teacher-only regularizer path (needs a store with question features).", True)
    freeze_recalibrator: bool = flag("Stage 2: keep the Recalibrator fixed (as the paper's figure shows).", False)
    train_vision: bool = flag("Also train the student's vision tower (frozen by default).", False)
    recalibrator_layers: int = flag("Decoder blocks in the Recalibrator.", 2)
    recalibrator: Path | None = flag("Stage-1 Recalibrator to start stage 2 from: a stage folder (run/stage1/final) "
                                     "or its recalibrator/ subfolder (default: output/stage1/final).", None)
    trust_remote_code: bool = flag("Allow the student's own modelling code (only for checkpoints you trust).", False)
    processor_kwargs: str = flag("Settings for the student's processor as JSON, e.g. '{\"max_pixels\": 1003520}'; "
                                 "saved with the student.", "")
    gradient_checkpointing: bool = flag("Recompute the student's activations in backward to save memory.", False)
    lora_rank: int = flag("Train the student through LoRA adapters of this rank in stages 2-3 (0: full fine-tune, "
                          "fp32 master weights). The projector trains in full, the Recalibrator stays full, and "
                          "each stage saves the student with the adapters merged. Needs genrecal[lora].", 0)
    lora_alpha: float | None = flag("LoRA scaling numerator: updates are scaled by alpha / rank (default 2 x "
                                    "rank).", None)
    lora_targets: str = flag("Linear layers that get adapters, by name, comma-separated (e.g. q_proj,v_proj), or "
                             "all-linear: every linear layer of the language model (not the head; the vision "
                             "encoder's too with --train-vision).", "all-linear")
    save_adapter: bool = flag("--lora-rank: also save each stage's adapter (final/adapter, PEFT format, for the "
                              "student that stage started from) beside the merged student.", False)
    block_size: int = flag("Samples per block of the shuffle (consecutive samples are read together).", 64)
    heldout_fraction: float = flag("Fraction of samples (by id) held out from training, for validation and the "
                                   "student-reliance check (0: train on every sample, no validation).", 0.05)
    eval_every: int = flag("Validate every this many steps (0: only at the end of each stage, which always "
                           "validates): the stage's losses on held-out samples and, in stages that train the "
                           "student, its greedy answers scored as eval-student scores them; logged as val_*.", 200)
    eval_loss_samples: int = flag("Held-out samples the validation losses are computed on (the first the student "
                                  "can take, in store order: the same in every run and rank).", 256)
    eval_samples: int = flag("Held-out samples the student answers greedily in validation (the first of those; 0: "
                             "no answers).", 32)
    eval_max_new_tokens: int = flag("Longest answer the student writes in validation.", 32)
    keep_best: BestMetric | None = flag("Also keep each stage's best student and Recalibrator by this validation "
                                        "metric in output/stage<k>/best/ (as final/): val_loss or one of its parts "
                                        "(lower is better), val_exact_match or val_normalised_match (higher is "
                                        "better; stages that train the student).", None)
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
    resume: bool = flag("Continue each stage from its last checkpoint, exactly (the checkpoint's options, store and "
                        "student must be this command's; docs/DESIGN.md says which options may change).", False)
    overwrite: bool = flag("Start over in an --output that holds a run of these stages: their output/stage<k>/ "
                           "folders are removed first (without it, or --resume, such an output is refused).", False)
    report_to: str = flag("Experiment trackers besides metrics.jsonl, comma-separated: tensorboard, wandb (W&B; "
                          "WANDB_MODE=offline works offline), mlflow (MLFLOW_TRACKING_URI, default "
                          "the file store output/mlruns); 'auto': TensorBoard when installed; 'none'.", "auto")
    verify_store: bool = flag("Read the whole store through its checksums before training (without it, only the "
                              "checks that cost no array reads; damaged chunks still stop training when read).",
                              False)
    allow_partial: bool = flag("Train on a store that is not complete (a part its --shard count declares missing, "
                               "or one its cache-teacher did not finish): the parts there are, named at start and "
                               "recorded in the run's config.yaml. Without it such a store is refused.", False)
    seed: int = flag("Seed for data order and initialisation.", 0)
    device: str = flag("auto, cpu, cuda, cuda:1, ...", "auto")
    impl: Impl = flag("Kernel paths: auto (Triton on CUDA, else chunked), triton, chunked or naive.", Impl.auto)
    progress: bool = flag("Show a progress bar.", True)
    storage_options: str | None = flag(STORAGE_OPTIONS_HELP, None)
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        self.store, self.output = store_path(self.store), Path(self.output)  # a URL stays text: Path folds its //
        self.storage_options_map = parse_storage_options(self.storage_options)
        self.report_to_backends = parse_report_to(self.report_to)
        if self.recalibrator is not None:
            self.recalibrator = Path(self.recalibrator)
        self.stage = to_choice(Stage, str(self.stage), "--stage")
        self.method = to_choice(Method, self.method, "--method")
        self.processor_kwargs_map = json_object(self.processor_kwargs, "--processor-kwargs")
        self.uld_source = to_choice(ULDSource, self.uld_source, "--uld-source")
        self.uld_align = to_choice(ULDAlign, self.uld_align, "--uld-align")
        if self.stage != Stage.all and int(self.stage.value) not in STAGES_OF[self.method.value]:
            raise ConfigError(f"--method {self.method} has no stage {self.stage} (its stages: "
                              f"{', '.join(map(str, STAGES_OF[self.method.value]))})")
        self.answer_inputs = to_choice(AnswerInputs, self.answer_inputs, "--answer-inputs")
        self.impl = to_choice(Impl, self.impl, "--impl")
        at_least(self, 1, "epochs", "batch_size", "grad_accum", "recalibrator_layers", "save_every", "log_every",
                 "block_size")
        at_least(self, 0, "num_workers", "warmup_steps", "reliance_every", "eval_every", "eval_samples")
        at_least(self, 1, "eval_loss_samples", "eval_max_new_tokens")
        if self.max_steps is not None:
            at_least(self, 1, "max_steps")
        at_least(self, 0, "lora_rank")
        if self.lora_rank and self.fsdp:
            raise ConfigError("--lora-rank with --fsdp is not supported: LoRA students are small enough to "
                              "replicate; drop --fsdp (DDP under torchrun) or train in full with --fsdp")
        if self.save_adapter and not self.lora_rank:
            raise ConfigError("--save-adapter keeps a LoRA adapter and needs --lora-rank R")
        if self.lora_alpha is None and self.lora_rank:  # without LoRA it stays unset (not shown as 0.0)
            self.lora_alpha = 2.0 * self.lora_rank
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ConfigError("--fsdp shards the models across processes, and this is one process: launch with "
                              "`torchrun --nproc-per-node N -m genrecal_train.cli ...` (N >= 2), or drop --fsdp")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --output, --overwrite removes it: pass one of them")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.keep_best is not None:
            self.keep_best = to_choice(BestMetric, self.keep_best, "--keep-best")
            if self.heldout_fraction == 0:
                raise ConfigError(f"--keep-best {self.keep_best} ranks checkpoints on held-out samples, and "
                                  "--heldout-fraction is 0: hold some out (e.g. --heldout-fraction 0.05) or drop "
                                  "--keep-best")
            if self.keep_best.value.endswith("_match") and self.eval_samples == 0:
                raise ConfigError(f"--keep-best {self.keep_best} scores the student's answers, and --eval-samples "
                                  "is 0: let it answer some (e.g. --eval-samples 32) or rank by val_loss")
        self.device = resolve_device(self.device)

    @property
    def lora(self) -> LoraSpec | None:
        """The LoRA adapters of stages 2-3, or None for a full fine-tune."""
        if not self.lora_rank:
            return None
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        return LoraSpec(self.lora_rank, self.lora_alpha, None if targets == ["all-linear"] else tuple(targets),
                        self.train_vision)

    @property
    def stages(self) -> list[int]:
        return STAGES_OF[self.method.value] if self.stage == Stage.all else [int(self.stage.value)]
