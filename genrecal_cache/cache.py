"""The `cache-teacher` job: read a manifest, render each conversation for the teacher, run it teacher-forced,
and append features, targets and top-k to this writer's part of the store, committing as it goes.

Re-running the same command resumes after the last commit; every manifest row ends committed or rejected.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import FORMAT_VERSION
from .chat import GenerationSettings, Rendered, compatible_runs, prompt_turns
from .config import Choice, at_least, resolve_device, to_choice
from .config import flag as _flag
from .dataset import Sample, parse_row, read_manifest, row_sample_id, scan_ids
from .errors import ConfigError, DatasetError, RejectError, StoreError
from .store_format import FEATURE_DTYPES, check_settings, from_storage, to_storage
from .store_writer import PartWriter, SampleRecord, open_or_create
from .teacher import Teacher, load_teacher, resolve_dtype


class Backend(Choice):
    hf = "hf"
    vllm = "vllm"


class Answers(Choice):
    dataset = "dataset"
    generate = "generate"


@dataclass
class CacheConfig:
    """Run the teacher once over a dataset, teacher-forced, and write its features at the answer positions,
    targets and top-k log-probabilities into a teacher store. Re-running the same command resumes."""

    teacher: str = _flag("Teacher model: a local directory (or a hub id where the hub is reachable).")
    manifest: Path = _flag("Dataset manifest: .jsonl or .parquet, messages or LLaVA format.")
    output: Path = _flag("Teacher store directory (a Zarr v3 group); created, or resumed when it exists.")
    backend: Backend = _flag("Teacher backend: 'hf' (transformers, runs anywhere) or 'vllm' (fast; needs vLLM).",
                             Backend.hf)
    tensor_parallel_size: int = _flag("vLLM: GPUs per engine (tensor parallelism).", 1)
    pipeline_parallel_size: int = _flag("vLLM: pipeline stages per engine (GPUs per engine: tensor x pipeline).", 1)
    data_parallel_size: int = _flag("Engines (or transformers teachers) run at once on this machine, each on its "
                                    "own GPUs and writing its own part: job --shard i/n runs parts i*d+j of n*d.", 1)
    gpu_memory_utilization: float | None = _flag("vLLM: fraction of device memory the engine reserves (on the CPU "
                                                 "backend, of RAM). Default 0.9 on GPU, 0.25 on CPU. With --answers generate, two engines (one "
                                                 "writes, one reads features) share it half and half.", None)
    max_model_len: int | None = _flag("vLLM: longest sequence the engine plans for (default: --max-length).", None)
    topk: int = _flag("Top-k teacher log-probabilities stored per label token (0: none).", 20)
    question_features: bool = _flag("Also store features at every non-label position (the trainer's regularizer needs them).", False)
    layers: str = _flag("Also store intermediate layers' hidden states at the label positions, comma-separated, e.g. "
                        "'8,16': layer k is the residual stream after decoder layer k (transformers' "
                        "hidden_states[k]; 0: the input embeddings). Default: the final features only.", "")
    answers: Answers = _flag("Where answers come from: 'dataset' (teacher-forced on the manifest's answers) or "
                             "'generate' (the teacher first writes each conversation's last answer, replacing it "
                             "or answering a final user turn, then is teacher-forced on it).", Answers.dataset)
    max_new_tokens: int = _flag("--answers generate: longest answer the teacher may write, in tokens.", 256)
    gen_temperature: float = _flag("--answers generate: sampling temperature (0: greedy).", 0.0)
    gen_top_p: float = _flag("--answers generate: nucleus sampling threshold (with a temperature > 0).", 1.0)
    gen_seed: int = _flag("--answers generate: sampling seed (each sample draws from its own seed and row, so a "
                          "resumed job writes the same answers).", 0)
    shard: str = _flag("This job's share 'i/n' of the manifest rows (row r belongs to shard r % n); each writes its own part.", "0/1")
    max_samples: int | None = _flag("Use only the first N manifest rows (before sharding).", None)
    max_length: int = _flag("Reject conversations longer than this many teacher tokens (0: no limit).", 4096)
    batch_tokens: int = _flag("Token budget of one forward batch (padded tokens).", 16384)
    dtype: str = _flag("Teacher compute and storage dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32.", "auto")
    device: str = _flag("Device for the teacher: auto, cpu, cuda, cuda:1, ...", "auto")
    device_map: str | None = _flag("transformers device_map, e.g. 'auto' to spread a large teacher over all GPUs.", None)
    commit_every: int = _flag("Commit after this many manifest rows (a crash loses at most this much work).", 256)
    strict: bool = _flag("Stop at the first bad row instead of recording it as a reject.", False)
    image_refs: bool = _flag("Keep image paths + digests in the sample table instead of the image bytes (for very large datasets).", False)
    allow_outside_root: bool = _flag("Let image paths point outside the manifest's folder (trusted manifests only).",
                                     False)
    trust_remote_code: bool = _flag("Allow the teacher's own modelling code (only for checkpoints you trust).", False)
    progress: bool = _flag("Show a progress bar.", True)
    result_json: Path | None = _flag("Also write the job's counts and timings to this JSON file.", None)
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        self.manifest, self.output = Path(self.manifest), Path(self.output)
        if self.result_json is not None:
            self.result_json = Path(self.result_json)
        self.backend = to_choice(Backend, self.backend, "--backend")
        self.answers = to_choice(Answers, self.answers, "--answers")
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
        at_least(self, 1, "batch_tokens", "commit_every", "tensor_parallel_size", "pipeline_parallel_size",
                 "data_parallel_size")
        if self.max_samples is not None and self.max_samples < 0:
            raise ConfigError(f"--max-samples must be >= 0, got {self.max_samples}")
        if self.max_length == 1 or self.max_length < 0:
            raise ConfigError(f"--max-length must be >= 2 (or 0: no limit), got {self.max_length}")
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ConfigError(f"--shard {self.shard}: need 0 <= i < n")
        self.shard_index, self.num_shards = i, n
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--dtype must be one of auto, {', '.join(FEATURE_DTYPES)}; got {self.dtype!r}")

    @property
    def generation(self) -> GenerationSettings | None:
        if self.answers != Answers.generate:
            return None
        return GenerationSettings(self.max_new_tokens, self.gen_temperature, self.gen_top_p, self.gen_seed)

    @property
    def part_name(self) -> str:
        return f"shard-{self.shard_index:05d}-of-{self.num_shards:05d}"


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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("genrecal", "torch", "transformers", "zarr", "numcodecs", "pyarrow", "vllm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _provenance(cfg: CacheConfig) -> dict[str, Any]:
    return {"command": cfg.command, "versions": _versions(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {k: str(v) for k, v in asdict(cfg).items() if k != "command"}}


def _check_output(path: Path) -> None:
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {path}: {parent} is not writable; choose a directory you can write to")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {path} is a file; pass a directory for the store")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
        raise ConfigError(f"--output {path} is a non-empty directory that is not a teacher store; "
                          "pass a new or empty directory")


class CacheJob:
    """One writer: `run()` processes this shard's rows from where the last run committed."""

    def __init__(self, cfg: CacheConfig, teacher: Teacher | None = None):
        if not cfg.manifest.is_file():
            raise DatasetError(f"--manifest {cfg.manifest}: file not found")
        _check_output(cfg.output)
        self.cfg = cfg
        settings = self._settings()
        check_settings(cfg.output, settings)  # before loading a teacher that may take minutes to load
        self.teacher = teacher or load_teacher(cfg)
        self.renderer = self.teacher.renderer(cfg.max_length or None)
        t = self.teacher
        n_layers = t.config.get_text_config().num_hidden_layers
        if cfg.layer_ids and cfg.layer_ids[-1] >= n_layers:
            raise ConfigError(f"--layers {cfg.layers}: the teacher has {n_layers} decoder layers, choose among "
                              f"0..{n_layers - 1} (after the last one come the final features, always stored)")
        if cfg.topk >= t.head.weight.shape[0]:
            raise ConfigError(f"--topk {cfg.topk} must be smaller than the teacher's vocabulary "
                              f"({t.head.weight.shape[0]})")
        meta = {
            "format_version": FORMAT_VERSION,
            **settings,
            "teacher": t.identity(),
            "head": {"dtype": cfg.dtype, "tied": t.tied, "bias": t.head.bias is not None,
                     "logit_scale": t.head.logit_scale, "softcap": t.head.softcap},
            "provenance": _provenance(cfg),
        }
        self.meta = open_or_create(cfg.output, meta, t.head_tensors(), self.renderer.tokenizer)
        self.writer = PartWriter(cfg.output, cfg.part_name, self.meta, _provenance(cfg))

    def _settings(self) -> dict[str, Any]:
        """What decides the store's content besides the teacher; every job writing to a store must agree."""
        cfg = self.cfg
        return {
            "dtype": cfg.dtype,
            "feature_dtype": cfg.dtype,
            "topk": cfg.topk,
            "question_features": cfg.question_features,
            "layers": list(cfg.layer_ids),
            "max_length": cfg.max_length,
            "num_shards": cfg.num_shards,
            "answers": cfg.answers.value,
            "generation": asdict(cfg.generation) if cfg.generation else None,
            "manifest": cfg.manifest.name,
            "manifest_digest": _file_digest(cfg.manifest),
            "backend": cfg.backend.value,
        }

    def run(self) -> CacheResult:
        try:
            return self._run()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StoreError(
                f"out of disk space writing {self.cfg.output} ({e.strerror}); everything up to commit "
                f"{self.writer.seq - 1} is kept (manifest rows < {self.writer.rows_end}). Free space and re-run "
                "the same command to continue.") from None

    def _run(self) -> CacheResult:
        cfg, w = self.cfg, self.writer
        res, t0 = CacheResult(), time.perf_counter()
        total, duplicates = scan_ids(cfg.manifest)
        if cfg.max_samples is not None:
            total = min(total, cfg.max_samples)
        mine = len(range(cfg.shard_index, total, cfg.num_shards))
        done = len(range(cfg.shard_index, min(w.rows_end, total), cfg.num_shards))
        res.skipped = done
        bar = tqdm(total=mine, initial=done, unit="sample", disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"cache-teacher {cfg.part_name}")
        pending: list[tuple[Sample, Rendered]] = []
        since_commit = 0
        for row in read_manifest(cfg.manifest):
            if cfg.max_samples is not None and row.index >= cfg.max_samples:
                break
            if row.index < w.rows_end or row.index % cfg.num_shards != cfg.shard_index:
                continue
            sample_id = row_sample_id(row)
            try:
                if row.index in duplicates:
                    raise RejectError(f"duplicate sample id {sample_id!r} (first at row {duplicates[row.index]})")
                sample = parse_row(row, cfg.manifest.parent, cfg.allow_outside_root, need_answer=not cfg.generation)
                # With --answers generate, the prompt now (early rejects), the whole conversation once answered.
                rendered = self.renderer.render_prompt(sample) if cfg.generation else self.renderer.render(sample)
                pending.append((sample, rendered))
            except RejectError as e:
                if cfg.strict:
                    raise DatasetError(f"{cfg.manifest}, row {row.index} ({sample_id}): {e.reason} "
                                       "(drop --strict to record bad rows as rejects and go on)") from None
                w.reject(row.index, sample_id, e.reason)
                res.rejects += 1
            rows_end, since_commit = row.index + 1, since_commit + 1
            if sum(len(r.input_ids) for _, r in pending) >= cfg.batch_tokens:
                self._flush(pending, res)
                pending = []
            if since_commit >= cfg.commit_every:
                self._flush(pending, res)
                pending = []
                w.commit(rows_end)
                since_commit = 0
            bar.update(1)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(tok_s=f"{res.tokens / elapsed:.0f}", rejects=res.rejects, refresh=False)
        self._flush(pending, res)
        if w.num_pending or total > w.rows_end:
            w.commit(total)
        bar.close()
        res.seconds = time.perf_counter() - t0
        return res

    def _flush(self, pending: list[tuple[Sample, Rendered]], res: CacheResult) -> None:
        """Run the teacher over pending samples in token-budget batches and hand the results to the writer."""
        if self.cfg.generation:
            pending = self._write_answers(pending, res)
        for run in compatible_runs([r for _, r in pending], self.cfg.batch_tokens):
            self._forward([pending[i] for i in run], res)

    def _forward(self, batch: list[tuple[Sample, Rendered]], res: CacheResult) -> None:
        t0 = time.perf_counter()
        try:
            outs = self.teacher.forward(self.renderer, [r for _, r in batch], self.cfg.question_features,
                                        [[im.load() for im in s.images] for s, _ in batch], self.cfg.layer_ids)
        except Exception as e:  # e.g. out of memory, or a model that refuses this input
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) > 1:  # find the sample at fault: one at a time
                for item in batch:
                    self._forward([item], res)
                return
            sample, r = batch[0]
            reason = f"teacher forward failed ({len(r.input_ids)} tokens): {type(e).__name__}: {str(e)[:200]}"
            self._reject(sample, reason, res)
            return
        head = self.teacher.head
        for (sample, r), out in zip(batch, outs):
            if isinstance(out, RejectError):  # e.g. the engine tokenised the sample differently
                self._reject(sample, out.reason, res)
                continue
            # Round to the stored dtype first, so the top-k is exactly what head(stored features) gives.
            feats = from_storage(to_storage(out.features, self.meta["feature_dtype"]),
                                 self.meta["feature_dtype"])  # (A, D)
            rec = SampleRecord(
                sample_id=sample.sample_id, source_row=sample.source_row, messages=sample.messages,
                images=sample.images, token_ids=r.input_ids, label_mask=r.label_mask, features=feats,
                targets=r.targets, segments=[s.to_dict() for s in r.segments],
                question_features=out.question, layers=out.layers,
                answers_generated=self.cfg.generation is not None,
            )
            if self.cfg.topk:
                ids, lps = head.topk(feats.to(head.weight.device), self.cfg.topk)
                rec.topk_ids, rec.topk_logprobs = ids.cpu(), lps.cpu()
            self.writer.add(rec, keep_image_bytes=not self.cfg.image_refs)
            res.samples += 1
            res.tokens += len(r.input_ids)
            res.label_tokens += len(r.targets)
        res.forward_seconds += time.perf_counter() - t0

    def _write_answers(self, pending: list[tuple[Sample, Rendered]], res: CacheResult
                       ) -> list[tuple[Sample, Rendered]]:
        """Let the teacher write each sample's last answer; returns the answered samples, rendered whole."""
        if not pending:
            return []
        gen, t0 = self.cfg.generation, time.perf_counter()
        try:
            outs = self.teacher.generate(self.renderer, [r for _, r in pending],
                                         [[im.load() for im in s.images] for s, _ in pending], gen,
                                         [gen.seed * 1_000_003 + s.source_row for s, _ in pending])
        except Exception as e:  # as in _forward: find the sample at fault
            if len(pending) > 1:
                return [item for p in pending for item in self._write_answers([p], res)]
            self._reject(pending[0][0], f"teacher generation failed: {type(e).__name__}: {str(e)[:200]}", res)
            return []
        answered = []
        for (sample, _), g in zip(pending, outs):
            if isinstance(g, RejectError):
                self._reject(sample, f"the teacher could not write an answer: {g.reason}", res)
                continue
            text = self.renderer.tokenizer.decode(g.token_ids, skip_special_tokens=True)
            new = Sample(sample.sample_id, sample.source_row,
                         [*prompt_turns(sample.messages), {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                         sample.images)
            try:
                if not text.strip():
                    raise RejectError("it is empty (the teacher ended its answer at once)")
                r = self.renderer.render(new)
            except RejectError as e:
                self._reject(sample, f"the teacher's generated answer cannot be used: {e.reason}", res)
                continue
            start = r.answer_spans[-1][0]
            if r.input_ids[start : start + len(g.token_ids)].tolist() != g.token_ids:
                res.retokenized += 1  # still teacher-forced on its own text, tokenised canonically
            answered.append((new, r))
        res.generate_seconds += time.perf_counter() - t0
        return answered


    def _reject(self, sample: Sample, reason: str, res: CacheResult) -> None:
        if self.cfg.strict:
            raise DatasetError(f"{self.cfg.manifest}, row {sample.source_row} ({sample.sample_id}): {reason}")
        self.writer.reject(sample.source_row, sample.sample_id, reason)
        res.rejects += 1


def run_cache(cfg: CacheConfig, teacher: Teacher | None = None) -> CacheResult:
    """Run the job; a teacher it loads itself (none given) is closed at the end (a vLLM engine's processes)."""
    if cfg.data_parallel_size > 1:
        from .parallel import run_data_parallel

        return run_data_parallel(cfg)
    job = CacheJob(cfg, teacher)
    try:
        return job.run()
    finally:
        if teacher is None:
            job.teacher.close()
