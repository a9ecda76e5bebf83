"""`eval-student`: greedy answers of any checkpoint on a held-out manifest, scored against its last assistant
turn by exact match and normalised match; predictions written as JSONL.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from genrecal_cache.core.config import at_least, flag, json_object, resolve_device
from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.core.locations import STORAGE_OPTIONS_HELP, parse_storage_options, store_path
from genrecal_cache.core.models import load_model
from genrecal_cache.data.remote_sources import image_root, open_dataset
from genrecal_cache.data.render import Rendered, Renderer
from genrecal_cache.data.rows import Columns, Sample, parse_row
from genrecal_cache.data.sources import Source


@dataclass
class EvalConfig:
    """Score a student's greedy answers on a held-out manifest (exact and normalised match)."""

    student: str = flag("Model directory to evaluate (a base student or any stage's final/student).")
    manifest: str = flag("Held-out data, in any form cache-teacher reads (file, folder or glob of shards, "
                         "save_to_disk folder, hub:ORG/NAME, or a file, prefix or glob on an object store: "
                         "s3://bucket/data/test.jsonl); each row's last assistant turn (or answer column) is the gold "
                         "answer.")
    split: str | None = flag("The split to read where the data holds several.", None)
    columns: str = flag("Column mapping for flat tables, as for cache-teacher (question=...,answer=...,image=...).",
                        "")
    image_root: str | None = flag("Where relative image paths resolve: a folder or an object store prefix (default: "
                                  "the manifest's folder).", None)
    trust_remote_code: bool = flag("Allow the student's own modelling code (only for checkpoints you trust).", False)
    processor_kwargs: str = flag("Settings for the student's processor as JSON, e.g. '{\"max_pixels\": 1003520}'.",
                                 "")
    output: Path | None = flag("Write one JSON line per row (prompt id, gold, prediction, scores) here.", None)
    max_new_tokens: int = flag("Longest answer generated.", 32)
    max_samples: int | None = flag("Evaluate only the first N rows.", None)
    device: str = flag("auto, cpu, cuda, ...", "auto")
    progress: bool = flag("Show a progress bar.", True)
    storage_options: str | None = flag(STORAGE_OPTIONS_HELP, None)
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self) -> None:
        self.manifest = str(self.manifest)
        self.output = None if self.output is None else Path(self.output)
        self.image_root = None if self.image_root is None else store_path(self.image_root)  # a URL stays text
        self.storage_options_map = parse_storage_options(self.storage_options)
        try:
            self.column_map = Columns.parse(self.columns)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.processor_kwargs_map = json_object(self.processor_kwargs, "--processor-kwargs")
        at_least(self, 1, "max_new_tokens")
        self.device = resolve_device(self.device)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style answer normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _text(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p["type"] == "text")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Accuracy of greedy answers; rows that cannot be read or rendered are counted as skipped."""
    source = open_dataset(cfg.manifest, cfg.split, cfg.storage_options_map)
    loaded = load_model(cfg.student, dtype="auto", device=cfg.device, flag="--student",
                        trust_remote_code=cfg.trust_remote_code,
                        processor_kwargs=cfg.processor_kwargs_map)
    model, renderer = loaded.model.eval(), Renderer(loaded.processor)  # the prompts training renders
    rows, skipped = [], []
    with cfg.output.open("w") if cfg.output else contextlib.nullcontext() as out:
        _answer_rows(cfg, source, model, renderer, rows, skipped, out)
    n = len(rows)
    return {"student": cfg.student, "samples": n, "skipped": len(skipped),
            "exact_match": sum(r["exact"] for r in rows) / n if n else None,
            "normalised_match": sum(r["normalised"] for r in rows) / n if n else None,
            "skipped_rows": skipped[:20]}


@torch.no_grad()
def answer_ids(model: Any, renderer: Renderer, inputs: dict[str, torch.Tensor], max_new_tokens: int,
               synced_gpus: bool = False) -> list[int]:
    """The model's greedy answer to a rendered prompt; it may never write an image placeholder (an untrained
    student's head can favour them, and they would eat the answer). `synced_gpus`: every rank keeps running
    forwards until all are done (a model sharded with FSDP gathers its layers in each)."""
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced_gpus,
                         pad_token_id=renderer.tokenizer.pad_token_id, suppress_tokens=renderer.image_token_ids or None)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def prompt_and_gold(sample: Sample, renderer: Renderer) -> tuple[Rendered, str]:
    """What the model continues (every turn before the last assistant turn, with the generation prompt) and that
    turn's text, the gold answer; RejectError (or ValueError: no assistant turn) when there is none."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    prompt = renderer.render_prompt(Sample(sample.sample_id, sample.source_row, sample.messages[: last + 1],
                                           sample.images))
    return prompt, _text(sample.messages[last])


def greedy_answer(model: Any, renderer: Renderer, prompt: Rendered, device: str | torch.device, max_new_tokens: int,
                  synced_gpus: bool = False) -> str:
    """The model's greedy answer to `prompt` as text (special tokens dropped, stripped), as eval-student scores it."""
    inputs = {k: v.to(device) for k, v in prompt.inputs.items()}
    ids = answer_ids(model, renderer, inputs, max_new_tokens, synced_gpus)
    return renderer.tokenizer.decode(ids, skip_special_tokens=True).strip()


def score(prediction: str, gold: str) -> dict[str, bool]:
    """Exact match (the gold answer stripped) and normalised match (see `normalise`)."""
    return {"exact": prediction == gold.strip(), "normalised": normalise(prediction) == normalise(gold)}


def _answer_rows(cfg: EvalConfig, source: Source, model: Any, renderer: Renderer, rows: list[dict],
                 skipped: list[dict], out: Any) -> None:
    root = image_root(cfg.image_root, source, cfg.storage_options_map)
    for row in tqdm(source.rows(), disable=not cfg.progress, desc="eval-student", unit="sample"):
        if cfg.max_samples is not None and row.index >= cfg.max_samples:
            break
        try:
            sample = parse_row(row, root, columns=cfg.column_map)
            prompt, gold = prompt_and_gold(sample, renderer)
        except (RejectError, ValueError) as e:
            skipped.append({"row": row.index, "reason": getattr(e, "reason", str(e))})
            continue
        pred = greedy_answer(model, renderer, prompt, cfg.device, cfg.max_new_tokens)
        rec = {"id": sample.sample_id, "row": row.index, "gold": gold, "prediction": pred, **score(pred, gold)}
        rows.append(rec)
        if out:
            out.write(json.dumps(rec) + "\n")
