"""What stops a stage rather than let it write nonsense: a step whose loss or gradient is not finite (named with its
samples, before the optimizer changes a weight), and a stage that found no sample it could train on (named why).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from genrecal_cache.core.errors import TrainingError, reason_kind
from genrecal_cache.store.reader import TeacherSample, TeacherStore

from . import dist
from .data import TrainSample, is_heldout


def non_finite_arrays(t: TeacherSample) -> list[str]:
    """The stored arrays of sample `t` that hold NaN or inf."""
    arrays = {"features": t.features, "topk_logprobs": t.topk_logprobs, "question_features": t.question_features,
              **{f"layers/{k}": v for k, v in t.layers.items()}}
    return [name for name, a in arrays.items() if a is not None and not bool(torch.isfinite(a).all())]


def non_finite(stage: int, step: int, what: str, value: float, mine: list[TrainSample], store: Path,
               saved_step: int | None) -> TrainingError:
    """The error of step `step` (1-based) whose `what` (loss, gradient norm) is `value`, naming every rank's
    samples `mine` of the passes that went wrong, and which of them hold non-finite teacher values in the store.
    Every rank calls it (the samples are gathered)."""
    found = dist.gather([(s.teacher.sample_id, non_finite_arrays(s.teacher)) for s in mine])
    samples = [sid for rank in found for sid, _ in rank]
    stored = {sid: arrays for rank in found for sid, arrays in rank if arrays}
    kept = ("no weight changed; " + (f"the checkpoint of step {saved_step} is intact" if saved_step is not None
                                     else "no checkpoint was written"))
    head = (f"stage {stage}, step {step}: the {what} is {value} (not finite); stopped before the optimizer step, so "
            f"{kept}. Samples of the step: {_names(samples)}.")
    if stored:
        where = "; ".join(f"{sid} ({', '.join(arrays)})" for sid, arrays in sorted(stored.items()))
        return TrainingError(f"{head}\nThe store holds non-finite teacher values in {where}: `inspect-cache --store "
                             f"{store} --verify` names every one. Re-create the part with cache-teacher (a teacher "
                             "that overflows float16: --dtype bfloat16 or float32), then train again with --overwrite")
    return TrainingError(f"{head}\nTheir stored teacher values are finite: the training diverged. Train again with "
                         "--overwrite and a lower --lr (or --max-grad-norm, --warmup-steps)")


def nothing_to_train(stage: int, store: TeacherStore, mine: dict[str, str], heldout_fraction: float
                     ) -> TrainingError:
    """The error of a stage that took no step: every sample was held out, or the student could take none of the
    others; `mine`: this rank's samples the student could not take, with why (every rank calls: they are gathered)."""
    rejected = {sid: why for rank in dist.gather(mine) for sid, why in rank.items()}
    ids = [sid for p in store.parts for sid in p.samples.column("sample_id").to_pylist()]
    held = sum(is_heldout(sid, heldout_fraction) for sid in ids)
    msg = f"stage {stage} has nothing to train on: of the {len(ids)} samples in {store.path}, {held} are held out " \
          f"(--heldout-fraction {heldout_fraction})"
    if not rejected:
        return TrainingError(f"{msg}, and no other was given to this stage. Lower --heldout-fraction, or cache more "
                             "samples")
    kinds = Counter(reason_kind(r) for r in rejected.values())
    example = {reason_kind(r): (sid, r) for sid, r in reversed(rejected.items())}
    why = "; ".join(f"{n} x {kind} (e.g. {example[kind][0]}: {example[kind][1][:200]})"
                    for kind, n in kinds.most_common(3))
    return TrainingError(f"{msg}, and the student could take none of the other {len(rejected)}: {why}.\nTrain a "
                         "student that takes these samples (a vision-language student for a store with images; the "
                         "same turns as the teacher's), or make their inputs readable (a store written with "
                         "--image-refs reads each image from the path it recorded: put the images back there)")


def _names(samples: list[str], limit: int = 16) -> str:
    more = f" and {len(samples) - limit} more" if len(samples) > limit else ""
    return ", ".join(samples[:limit]) + more
