"""A store's size on paper: the bytes a store of a stated dataset and settings takes (`store_bytes`), for the
sizing table of docs/store.md and the projected size `inspect-cache --progress` prints for a store being written.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import FP8

# Bytes per stored feature value; fp8 (e4m3) rows also keep one float32 scale each.
VALUE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, FP8: 1}
ROW_SCALE_BYTES = {FP8: 4}


@dataclass(frozen=True)
class StoreShape:
    """What decides a store's bytes: the dataset (per-sample means) and the cache job's settings."""

    samples: float
    answer_tokens: float  # label positions per sample
    question_tokens: float  # every other position per sample, image tokens included
    hidden_size: int
    feature_dtype: str = "bfloat16"
    topk: int = 20
    question_fraction: float = 1.0  # --question-features-fraction; 0: no --question-features
    layers: int = 0  # --layers stored beside the final features
    image_bytes: float = 0.0  # encoded image bytes the table keeps per sample (0 with --image-refs)
    compression: float = 1.0  # raw array bytes / stored array bytes (zstd)


def store_bytes(s: StoreShape) -> dict[str, float]:
    """The store's bytes by what holds them (`features` with --layers, `question_features`, `other`: token ids,
    masks, targets and top-k; `images`) and their `total`; arrays divided by `s.compression`."""
    row = s.hidden_size * VALUE_BYTES[s.feature_dtype] + ROW_SCALE_BYTES.get(s.feature_dtype, 0)  # one feature row
    answers, questions = s.samples * s.answer_tokens, s.samples * s.question_tokens
    arrays = {
        "features": answers * row * (1 + s.layers),
        "question_features": questions * s.question_fraction * row,
        "other": (answers + questions) * (4 + 1) + answers * (4 + s.topk * (4 + 4)),  # int32 ids, uint8 mask; targets,
        # int32 top-k ids and float32 log-probabilities
    }
    out = {k: v / s.compression for k, v in arrays.items()}
    out["images"] = s.samples * s.image_bytes
    out["total"] = sum(out.values())
    return out


def human(n: float) -> str:
    """Bytes as the largest binary unit that keeps them >= 1 (e.g. '1.3 TiB')."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def sizing_table(samples: int, answer_tokens: float, question_tokens: float, fractions: tuple[float, ...],
                 widths: tuple[int, ...] = (3584, 8192), dtypes: tuple[str, ...] = ("bfloat16", FP8)) -> str:
    """docs/store.md's table: the store's bytes (uncompressed, images by reference) for each width, dtype and
    fraction, and without question features."""
    cols = ["no question features", *(f"F = {f:g}" for f in fractions)]
    lines = ["| D | features | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for d in widths:
        for dt in dtypes:
            cells = [human(store_bytes(StoreShape(samples, answer_tokens, question_tokens, d, dt,
                                                  question_fraction=f))["total"]) for f in (0.0, *fractions)]
            lines.append(f"| {d} | {'fp8' if dt == FP8 else dt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
