"""A stage's start-up checks, before anything trains: the store is there, undamaged and has what the stage needs,
and a checkpoint being resumed was written by a run like this one (processes, LoRA choices).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from genrecal_cache.core.errors import ConfigError, StoreError
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.verify import format_verify, verify

from .config import TrainConfig, ULDSource
from .stages import StagePlan


def open_store(cfg: TrainConfig, plan: StagePlan) -> TeacherStore:
    """The teacher store, refused when it is empty, damaged (never train on a damaged store) or not complete (a
    declared part missing or unfinished) unless --allow-partial, or when the stage's ULD loss asks for top-k
    log-probabilities it does not hold."""
    store = TeacherStore(cfg.store, storage_options=cfg.storage_options_map)
    if len(store) == 0:
        raise StoreError(f"{cfg.store} has no committed samples; run cache-teacher first")
    problems, _ = store.completeness()
    if problems and not cfg.allow_partial:
        raise StoreError(f"{cfg.store} is not complete; not training on part of it:\n" + "\n".join(
            f"  {why}" for _, why in problems) + "\nFinish it with cache-teacher (the same commands resume), or "
            "pass --allow-partial to train on the parts there are (recorded in the run's config.yaml).")
    if problems:
        print(f"train-student: --allow-partial: training on an incomplete store ({len(problems)} part(s) missing or "
              f"unfinished: {', '.join(part for part, _ in problems)})", file=sys.stderr)
    report = verify(store, full=cfg.verify_store, allow_partial=True)  # completeness was judged just above
    if not report.ok:
        raise StoreError(f"{cfg.store} is damaged; not training on it.\n{format_verify(report)}\n"
                         "Re-create the damaged part with cache-teacher (or restore it from a copy).")
    if plan.uld and cfg.uld_source == ULDSource.topk and not store.meta["topk"]:
        raise ConfigError(f"--uld-source topk needs a store with top-k log-probabilities; {cfg.store} has none "
                          "(written with --topk 0): use --uld-source full")
    return store


def check_resumable(state: dict[str, Any], ckpt: Path, world: int, lora_base: str | None,
                    lora_now: dict[str, Any] | None) -> None:
    """Refuse a checkpoint written by another number of processes, or with other --lora-rank choices
    (`lora_base`: the student this run's adapters go on, None for a full fine-tune; `lora_now`: its LoRA spec)."""
    if state["world"] != world:
        raise ConfigError(f"the checkpoint in {ckpt} was written by {state['world']} processes, this run "
                          f"has {world}: resume with the same number of processes")
    if state.get("lora_base") == lora_base and state.get("lora") != lora_now:
        raise ConfigError(f"the checkpoint in {ckpt} was trained with LoRA {state.get('lora')}, this run "
                          f"asks for {lora_now}: resume with the --lora-* options it was started with")
    if state.get("lora_base") != lora_base:
        raise ConfigError(f"the checkpoint in {ckpt} was trained " + (
            f"with LoRA adapters on {state['lora_base']}" if state.get("lora_base") else "without --lora-rank")
            + ", this run asks for " + (f"adapters on {lora_base}" if lora_base else "a full fine-tune")
            + ": resume with the options it was started with")
