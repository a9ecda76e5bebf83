"""The `cache-teacher` job: read a manifest, render each conversation for the teacher, run it teacher-forced,
and append features, targets and top-k to this writer's part of the store, committing as it goes.

Re-running the same command resumes after the last commit; every manifest row ends committed or rejected.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from genrecal_cache.core.config import write_config
from genrecal_cache.core.errors import ConfigError, DatasetError, RejectError, StoreError, StoreServerError
from genrecal_cache.core.locations import Location
from genrecal_cache.core.provenance import provenance
from genrecal_cache.data.remote_sources import image_root, open_dataset
from genrecal_cache.data.render import Rendered, Truncated, compatible_runs, prompt_turns
from genrecal_cache.data.render_pool import Preparer, RenderPool, RenderWorkerError, Task
from genrecal_cache.data.rows import Sample, row_sample_id, unicode_safe
from genrecal_cache.data.sources import Source
from genrecal_cache.store.dtypes import stored_features
from genrecal_cache.store.format import FORMAT_VERSION, check_mixed, check_settings
from genrecal_cache.store.part_files import part_files
from genrecal_cache.store.reader import Part
from genrecal_cache.store.record import NonFiniteError, SampleRecord
from genrecal_cache.store.writer import PartWriter, open_or_create
from genrecal_cache.teacher.base import Teacher
from genrecal_cache.teacher.failures import Failed, Guard, TeacherDown, describe
from genrecal_cache.teacher.load import load_teacher

from .config import CacheConfig, CacheResult
from .preflight import check_output, check_source, plan_ids

MIN_ROWS_FOR_REJECT_FRACTION = 100  # --max-reject-fraction judges no fewer rows than this


class _TooManyRejects(Exception):
    """More than --max-reject-fraction of the rows were rejected (the message is made once they are committed)."""


class _Stop(Exception):
    """Stop mid-flush: `args[0](rows_end, res)` is the error raised once the rows below `rows_end` are committed."""


class CacheJob:
    """One writer: `run()` processes this shard's rows from where the last run committed."""

    def __init__(self, cfg: CacheConfig, teacher: Teacher | None = None):
        self.source: Source = open_dataset(cfg.manifest, cfg.split, cfg.storage_options_map)
        self.image_root = image_root(cfg.image_root, self.source, cfg.storage_options_map)
        if isinstance(self.image_root, Path) and not self.image_root.is_dir():  # a prefix is never listed
            raise ConfigError(f"--image-root {self.image_root}: no such folder")
        self.store = Location.of(cfg.output, cfg.storage_options_map)
        check_output(self.store)
        self.cfg = cfg
        settings = self._settings()
        self.source_identity = settings["source"]
        check_source(self.store, settings["source"])
        check_settings(self.store, settings)  # before loading a teacher that may take minutes to load
        self.teacher = teacher or load_teacher(cfg.teacher_spec)
        self.renderer = self.teacher.renderer(cfg.max_length or None)
        t = self.teacher
        n_layers = t.config.get_text_config().num_hidden_layers
        if cfg.layer_ids and cfg.layer_ids[-1] >= n_layers:
            raise ConfigError(f"--layers {cfg.layers}: the teacher has {n_layers} decoder layers, choose among "
                              f"0..{n_layers - 1} (after the last one come the final features, always stored)")
        if cfg.topk >= t.head.weight.shape[0]:
            raise ConfigError(f"--topk {cfg.topk} must be smaller than the teacher's vocabulary "
                              f"({t.head.weight.shape[0]})")
        prov = provenance(cfg)
        meta = {
            "format_version": FORMAT_VERSION,
            **settings,
            "teacher": t.identity(cfg.rehash),
            "head": {"dtype": cfg.dtype, "tied": t.tied, "bias": t.head.bias is not None,
                     "logit_scale": t.head.logit_scale, "softcap": t.head.softcap},
            "provenance": prov,
        }
        self.meta = open_or_create(self.store, meta, t.head_tensors(), self.renderer.tokenizer)
        prov.update(check_mixed(self.store, cfg.part_name, meta))  # the part records how this run computes
        files = part_files(self.store, cfg.part_name, cfg.lease_seconds, cfg.take_over_lease,
                           cfg.allow_unconditional_writes)
        self.writer = PartWriter(self.store, cfg.part_name, self.meta, prov, files)
        write_config(cfg, self.store.join("configs", f"{cfg.part_name}.yaml"))  # --config of it repeats this part
        self._truncated: set[str] = set()  # generated answers kept although cut off (--truncated keep)
        # --retry-rejects: rows < rows_end whose standing reject is retryable, run again before the new rows
        self.retry = Part(self.store, cfg.part_name, self.meta).retryable_rows() if cfg.retry_rejects else set()
        self._undone: set[int] = set()  # rows of the flush under way with nothing recorded yet
        self._guards = (Guard(self._run_forward), Guard(self._run_generate, "generate"))

    def _settings(self) -> dict[str, Any]:
        """What decides the store's content besides the teacher; every job writing to a store must agree."""
        cfg = self.cfg
        return {
            "dtype": cfg.dtype,
            "feature_dtype": cfg.feature_dtype,
            "topk": cfg.topk,
            "question_features": cfg.question_features,
            "question_features_fraction": cfg.question_features_fraction,
            "layers": list(cfg.layer_ids),
            "max_length": cfg.max_length,
            "num_shards": cfg.num_shards,
            "answers": cfg.answers.value,
            "generation": asdict(cfg.generation) if cfg.generation else None,
            "manifest": cfg.manifest,
            "source": self.source.identity(cfg.rehash),
            "split": cfg.split,
            "columns": asdict(cfg.column_map),
            "duplicate_ids": cfg.duplicate_ids.value,
            "processor_kwargs": cfg.processor_kwargs_map,
            "backend": cfg.backend.value,
            "writer": cfg.writer_record,  # how the numbers are computed: compared by check_mixed
        }

    def run(self) -> CacheResult:
        try:
            return self._run()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            seq, rows_end = self.writer.durable
            raise StoreError(
                f"out of disk space writing {self.cfg.output} ({e.strerror}); everything up to commit {seq} is "
                f"kept (manifest rows < {rows_end}). Free space and re-run the same command to continue.") from None
        except StoreServerError as e:
            seq, rows_end = self.writer.durable
            raise StoreServerError(f"{e}. Everything up to commit {seq} is kept (manifest rows < {rows_end}): re-run "
                                   "the same command once the server answers") from None
        finally:
            self.writer.close()  # the part's lock: a re-run in this process (after an error) may take it

    def _run(self) -> CacheResult:
        cfg, w = self.cfg, self.writer
        res, t0 = CacheResult(), time.perf_counter()
        total, tasks = self._tasks()
        res.skipped = len(range(cfg.shard_index, min(w.rows_end, total), cfg.num_shards))
        bar = tqdm(total=len(range(cfg.shard_index, total, cfg.num_shards)) + len(self.retry), initial=res.skipped,
                   unit="sample", disable=not cfg.progress, dynamic_ncols=True, desc=f"cache-teacher {cfg.part_name}")
        pending: list[tuple[Sample, Rendered]] = []
        since_commit = seen = 0
        rows_end = w.rows_end  # retried rows lie below it: it never goes back
        pool = self._render_pool()
        stop: Exception | None = None  # why the job stops early: raised once what was rendered is committed
        try:
            for task, outcome in pool.prepare(tasks):
                res.renamed += task.sample_id is not None
                res.retried += task.row.index in self.retry
                if isinstance(outcome, RejectError):
                    sample_id = task.sample_id or row_sample_id(task.row, cfg.column_map.id)
                    self._reject_row(task.row.index, sample_id, outcome.reason, res)
                else:
                    pending.append(outcome)
                rows_end, since_commit, seen = max(rows_end, task.row.index + 1), since_commit + 1, seen + 1
                if sum(len(r.input_ids) for _, r in pending) >= cfg.batch_tokens or since_commit >= cfg.commit_every:
                    self._flush(pending, res)
                    pending = []
                if since_commit >= cfg.commit_every:
                    w.commit(rows_end)
                    since_commit = 0
                bar.update(1)
                bar.set_postfix(tok_s=f"{res.tokens / max(time.perf_counter() - t0, 1e-9):.0f}", rejects=res.rejects,
                                refresh=False)
                if seen >= MIN_ROWS_FOR_REJECT_FRACTION and res.rejects > cfg.max_reject_fraction * seen:
                    stop = _TooManyRejects()
                    break
        except RenderWorkerError as e:
            # The rows since the last commit are redone by the re-run, not committed here: it then resumes at a
            # commit boundary, so its batches, and every feature byte, are those of an uninterrupted run.
            rows_end, pending = w.rows_end, []
            w.drop_from(rows_end)
            stop = RenderWorkerError(f"{e}. Every row before {rows_end} is committed: re-run the same command to "
                                     "continue (--render-workers 0 renders in the job's own process).")
        except _Stop as e:
            stop, pending = e, []
        finally:
            pool.close()
        if not isinstance(stop, _Stop):
            try:
                self._flush(pending, res)  # the one commit path: what was rendered is run, then committed
            except _Stop as e:
                stop = e
        if isinstance(stop, _Stop):  # rows from the first one not done are left to the next run
            rows_end = min((r for r in self._undone if r >= w.rows_end), default=rows_end)
            w.drop_from(rows_end)
            if w.num_pending or rows_end > w.rows_end:
                w.commit(rows_end)
            w.wait()
            raise stop.args[0](rows_end, res)
        if stop is not None:
            if w.num_pending or rows_end > w.rows_end:
                w.commit(rows_end)
        elif w.num_pending or total > w.rows_end:
            w.commit(total)  # every row of this shard is done
        w.wait()  # every commit durable before the job reports (a failed one raises its error here)
        bar.close()
        res.seconds = time.perf_counter() - t0
        if isinstance(stop, _TooManyRejects):
            raise DatasetError(
                f"stopped: {res.rejects} of the {seen} rows processed were rejected, more than "
                f"--max-reject-fraction {cfg.max_reject_fraction}. Top reasons: {res.top_reasons()}. The "
                f"{res.samples} good rows so far are committed; fix the data (or raise --max-reject-fraction) "
                "and re-run the same command to continue.")
        if stop is not None:
            raise stop
        if w.lengths["tokens"] == 0:
            raise DatasetError(
                f"no sample committed: {res.rejects} of {res.rejects + res.samples} rows rejected (top reasons: "
                f"{res.top_reasons()}). Check --manifest, --columns and --image-root; `inspect-cache --store "
                f"{cfg.output}` lists every reject.")
        return res

    def _tasks(self) -> tuple[int, Iterator[Task]]:
        """The rows to cache (manifest rows < the returned count) and this shard's tasks after the last commit,
        each with its id as renamed or rejected by the `--duplicate-ids` plan."""
        cfg, w = self.cfg, self.writer
        ids = self.source.kept_ids(cfg.column_map.id, self.source_identity)
        total, renamed, duplicates = plan_ids(ids, cfg.duplicate_ids)
        if cfg.max_samples is not None:
            total = min(total, cfg.max_samples)
        w.rows_total = total

        def tasks() -> Iterator[Task]:
            for row in self.source.rows():
                if row.index >= total:
                    return
                mine = row.index % cfg.num_shards == cfg.shard_index
                if row.index in self.retry or (mine and row.index >= w.rows_end):
                    yield Task(row, renamed.get(row.index), duplicates.get(row.index))

        return total, tasks()

    def _render_pool(self) -> RenderPool:
        """`--render-workers` processes that parse and render rows in order. With --answers generate they render
        the prompt first (early rejects); the whole conversation is rendered once answered."""
        cfg = self.cfg
        return RenderPool(Preparer(self.renderer, dict(
            root=self.image_root, allow_outside_root=cfg.allow_outside_root, need_answer=not cfg.generation,
            columns=cfg.column_map, allow_remote_images=cfg.allow_remote_images,
            remote_image_timeout=cfg.remote_image_timeout, remote_image_max_bytes=cfg.remote_image_max_bytes),
            prompt=bool(cfg.generation)), cfg.render_workers, ahead_tokens=2 * cfg.batch_tokens)

    def _flush(self, pending: list[tuple[Sample, Rendered]], res: CacheResult) -> None:
        """Run the teacher over pending samples in token-budget batches and hand the results to the writer. Raises
        `_Stop` when the teacher fails (or overflows float16): the rows not done are in `_undone`."""
        self._undone = {s.source_row for s, _ in pending}
        try:
            if self.cfg.generation:
                pending = self._write_answers(pending, res)
            for run in compatible_runs([r for _, r in pending], self.cfg.batch_tokens):
                self._forward([pending[i] for i in run], res)
        except TeacherDown as e:
            raise _Stop(lambda rows_end, res, e=e: e.failure(rows_end, res.samples)) from e

    def _run_forward(self, batch: list[tuple[Sample, Rendered]]) -> list[Any]:
        return self.teacher.forward(self.renderer, [r for _, r in batch], self.cfg.question_features,
                                    self._images(batch), self.cfg.layer_ids)

    def _run_generate(self, batch: list[tuple[Sample, Rendered]]) -> list[Any]:
        return self.teacher.generate(self.renderer, [r for _, r in batch], self._images(batch), self.cfg.generation,
                                     [self.cfg.generation.seed * 1_000_003 + s.source_row for s, _ in batch])

    def _forward(self, batch: list[tuple[Sample, Rendered]], res: CacheResult) -> None:
        t0 = time.perf_counter()
        outs = self._guards[0].run(batch)  # a failing batch is run one sample at a time (docs/DESIGN.md)
        head = self.teacher.head
        for (sample, r), out in zip(batch, outs):
            if isinstance(out, Failed):  # it raised alone while the teacher works: e.g. too big for the device
                self._reject(sample, f"teacher forward failed ({len(r.input_ids)} tokens): {describe(out.error)}",
                             res, retryable=True)
                continue
            if isinstance(out, RejectError):  # e.g. the engine tokenised the sample differently
                self._reject(sample, out.reason, res)
                continue
            # Round to the stored dtype first, so the top-k is exactly what head(stored features) gives.
            feats = stored_features(out.features, self.meta["feature_dtype"])  # (A, D)
            rec = SampleRecord(
                sample_id=sample.sample_id, source_row=sample.source_row, messages=sample.messages,
                images=sample.images, token_ids=r.input_ids, label_mask=r.label_mask, features=feats,
                targets=r.targets, segments=[s.to_dict() for s in r.segments],
                question_features=out.question, layers=out.layers,
                answers_generated=self.cfg.generation is not None,
                answer_truncated=sample.sample_id in self._truncated,
            )
            if self.cfg.topk:
                ids, lps = head.topk(feats.to(head.weight.device), self.cfg.topk)
                rec.topk_ids, rec.topk_logprobs = ids.cpu(), lps.cpu()
            try:
                self.writer.add(rec, keep_image_bytes=not self.cfg.image_refs)
            except NonFiniteError as e:
                self._non_finite(sample, e, res)
                continue
            self._undone.discard(sample.source_row)
            res.samples += 1
            res.tokens += len(r.input_ids)
            res.label_tokens += len(r.targets)
        res.forward_seconds += time.perf_counter() - t0

    def _non_finite(self, sample: Sample, e: NonFiniteError, res: CacheResult) -> None:
        """NaN/inf teacher values: in float16 the dtype overflows (an error with the fix), else the sample's reject."""
        if "float16" not in (self.meta["dtype"], self.meta["feature_dtype"]):
            self._reject(sample, e.reason, res, retryable=True)
            return
        raise _Stop(lambda rows_end, res: ConfigError(
            f"row {sample.source_row} ({sample.sample_id}): {e.reason}: the teacher overflows --dtype float16 (its "
            "range ends at 65504). Write its store with --dtype bfloat16 (or float32) to a new --output; every row "
            f"before {rows_end} is committed to {self.cfg.output}, which keeps float16."))

    def _write_answers(self, pending: list[tuple[Sample, Rendered]], res: CacheResult
                       ) -> list[tuple[Sample, Rendered]]:
        """Let the teacher write each sample's last answer; returns the answered samples, rendered whole."""
        if not pending:
            return []
        gen, t0 = self.cfg.generation, time.perf_counter()
        outs = self._guards[1].run(pending)  # as in _forward: a failing batch is run one sample at a time
        answered = []
        for (sample, _), g in zip(pending, outs):
            if isinstance(g, Failed):
                self._reject(sample, f"teacher generation failed: {describe(g.error)}", res, retryable=True)
                continue
            if isinstance(g, RejectError):
                self._reject(sample, f"the teacher could not write an answer: {g.reason}", res)
                continue
            if not g.stopped and gen.truncated == Truncated.reject:
                self._reject(sample, f"the teacher's answer was cut off at --max-new-tokens {gen.max_new_tokens} "
                             "without ending (raise --max-new-tokens, or --truncated keep)", res)
                continue
            # Special tokens the teacher wrote inside its answer (grounding boxes, ...) stay: only the stop token,
            # already cut, is dropped.
            text = self.renderer.tokenizer.decode(g.token_ids, skip_special_tokens=False)
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
            if not g.stopped:
                self._truncated.add(sample.sample_id)
            answered.append((new, r))
        res.generate_seconds += time.perf_counter() - t0
        return answered

    def _images(self, batch: list[tuple[Sample, Rendered]]) -> list[list[Any]]:
        """Each sample's decoded images, for a backend that takes them (for the others they are in the inputs)."""
        if not self.teacher.takes_images:
            return [[] for _ in batch]
        return [[im.load() for im in s.images] for s, _ in batch]

    def _reject(self, sample: Sample, reason: str, res: CacheResult, retryable: bool = False) -> None:
        self._reject_row(sample.source_row, sample.sample_id, reason, res, retryable)

    def _reject_row(self, row: int, sample_id: str, reason: str, res: CacheResult, retryable: bool = False) -> None:
        sample_id, reason = unicode_safe(sample_id), unicode_safe(reason)  # a lone surrogate cannot be stored
        if self.cfg.strict:
            raise DatasetError(f"{self.cfg.manifest}, row {row} ({sample_id}): {reason} (drop --strict to record "
                               "bad rows as rejects and go on)")
        self.writer.reject(row, sample_id, reason, retryable)
        self._undone.discard(row)
        res.add_reject(reason)
