"""The baselines from the same store: --method uld (Universal Logit Distillation in stage 2, then stage 3) and
--method sft (stage 3 alone), and how ULD pairs answer positions across tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.store.format import TOKENIZER_DIR
from genrecal_train.alignment import answer_pairs
from genrecal_train.config import TrainConfig
from genrecal_train.sequence import answer_spans
from genrecal_train.trainer import Trainer, train


@pytest.fixture(scope="module")
def store(zoo, demo_manifest, tmp_path_factory) -> Path:
    from .test_trainer import _store

    return _store(zoo, demo_manifest, tmp_path_factory.mktemp("methods") / "store", question_features=False)


def _cfg(store, zoo, out, **kw) -> TrainConfig:
    base = dict(store=store, student=str(zoo["idefics3"]), output=out, batch_size=4, epochs=6, lr=1e-3,
                lr_end=1e-4, log_every=1, heldout_fraction=0.0, reliance_every=0, progress=False, device="cpu",
                command=["t"])
    return TrainConfig(**{**base, **kw})


def _log(out: Path, stage: int, key: str) -> list[float]:
    recs = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


@pytest.mark.parametrize("source,align,fall", [("full", "index", 0.9), ("topk", "chars", 1.0)])
def test_uld_trains_and_its_loss_falls(store, zoo, tmp_path, source, align, fall):
    """ULD alone (no CE in stage 2) pulls the student's sorted distribution towards the teacher's: the loss falls.
    (With the CE beside it, this untrained teacher's flat distribution and the targets pull apart; against its
    top-20, which hold ~4% of its mass, the distance cannot go below ~0.95 and falls only a little.)"""
    outs = train(_cfg(store, zoo, tmp_path, method="uld", uld_source=source, uld_align=align, student_weight=0.0))
    assert [p.parent.name for p in outs] == ["stage2", "stage3"]
    assert not (tmp_path / "stage1").exists() and not (tmp_path / "stage2" / "final" / "recalibrator").exists()
    uld = _log(tmp_path, 2, "uld")
    assert len(uld) >= 6 and all(x == x for x in uld)
    assert sum(uld[-3:]) / 3 < fall * sum(uld[:3]) / 3, uld
    assert (tmp_path / "stage3" / "final" / "student" / "config.json").exists()
    assert _log(tmp_path, 3, "student")  # stage 3: the same fine-tune as every method


def test_sft_is_stage_3_alone_and_methods_refuse_stages_they_lack(store, zoo, tmp_path):
    outs = train(_cfg(store, zoo, tmp_path, method="sft", max_steps=2))
    assert [p.parent.name for p in outs] == ["stage3"]
    with pytest.raises(ConfigError, match="--method uld has no stage 1"):
        _cfg(store, zoo, tmp_path, method="uld", stage="1")
    with pytest.raises(ConfigError, match="--method sft has no stage 2"):
        _cfg(store, zoo, tmp_path, method="sft", stage="2")


def test_answer_pairs_by_index_and_by_characters(store, zoo, tmp_path):
    from transformers import AutoTokenizer

    t = Trainer(_cfg(store, zoo, tmp_path, method="uld", stage="2"), 2)
    with t:
        teacher_tok = AutoTokenizer.from_pretrained(str(store / TOKENIZER_DIR))
        for batch in [t.next_micro_batches()[0]]:
            for s in batch:
                pos, rows = answer_pairs(s, "index")
                n_s = int(s.student.label_mask.sum())
                spans = zip(answer_spans(s.student.segments), answer_spans(s.teacher.segments))
                assert len(pos) == len(rows) == sum(min(e1 - s1, e2 - s2) for (_, s1, e1), (_, s2, e2) in spans)
                assert all(s.student.label_mask[p] for p in pos) and rows == sorted(set(rows))
                cpos, crows = answer_pairs(s, "chars", t.renderer.tokenizer, teacher_tok)
                assert len(cpos) == n_s or len(cpos) == len(pos)  # every student token, or the fallback
                assert crows == sorted(crows) and all(0 <= r < len(s.teacher.targets) for r in crows)
                # the last pair: each side's end-of-turn token
                assert cpos[-1] == max(i for i, m in enumerate(s.student.label_mask) if m)
                assert crows[-1] == len(s.teacher.targets) - 1
