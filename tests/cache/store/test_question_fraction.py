"""--question-features-fraction: question features for a subset of samples chosen by id, the same in every run and
resume, fixed at creation; the trainer's regularizer over those samples alone, divided by their own label tokens;
and the sizes `inspect-cache` reports (what the fraction saved; the store's bytes on paper)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrecal_cache.inspection import summary
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.format import carries_question_features
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.store.size import StoreShape, sizing_table, store_bytes
from genrecal_train.config import TrainConfig
from genrecal_train.data import pairs
from genrecal_train.forward import Counts
from genrecal_train.trainer import Trainer
from tests.helpers import ROOT, run_command

F = 0.5
ENV = {"OMP_NUM_THREADS": "1"}


def _job(zoo, manifest: Path, out: Path, *flags: str) -> list[str]:
    return ["--teacher", zoo["llava"], "--manifest", manifest, "--output", out, "--question-features", "--dtype",
            "float32", "--device", "cpu", "--no-progress", "--render-workers", "0", "--commit-every", "4", *flags]


def _cache(zoo, manifest: Path, out: Path, *flags: str):
    return run_command("cache-teacher", *_job(zoo, manifest, out, *flags), env=ENV, timeout=600)


@pytest.fixture(scope="module")
def stores(zoo, demo_manifest, tmp_path_factory) -> dict[str, Path]:
    """The demo manifest cached with every sample's question features and with a fraction F of them, the latter in
    two runs (the first stopped at 8 rows by max_samples, the second resuming it); written in this process (the
    stores are this file's data; the tests below run the CLI's --question-features-fraction)."""
    root = tmp_path_factory.mktemp("qfrac")
    full, part = root / "full", root / "fraction"
    for out, options in ((full, {}), (part, {"question_features_fraction": F, "max_samples": 8}),
                         (part, {"question_features_fraction": F})):
        res = run_cache(CacheConfig(teacher=str(zoo["llava"]), manifest=demo_manifest, output=out,
                                    question_features=True, dtype="float32", device="cpu", progress=False,
                                    render_workers=0, commit_every=4, command=["test"], **options))
        assert res.samples > 0, res.top_reasons(5)
    return {"full": full, "fraction": part}


def _samples(path: Path) -> dict:
    store = TeacherStore(path)
    return {s.sample_id: s for p in store.parts for s in p.read(0, len(p))}


def test_the_subset_is_chosen_by_id_and_keeps_the_full_stores_bytes(stores):
    full, part = _samples(stores["full"]), _samples(stores["fraction"])
    assert full.keys() == part.keys()
    has = {sid: s.question_features is not None for sid, s in part.items()}
    assert has == {sid: carries_question_features(sid, F) for sid in part}
    assert 0 < sum(has.values()) < len(has), has  # the demo's ids fall on both sides
    for sid, s in part.items():  # everything else is what the full store holds, byte for byte
        assert torch.equal(s.features, full[sid].features) and torch.equal(s.targets, full[sid].targets)
        if has[sid]:
            assert torch.equal(s.question_features, full[sid].question_features)
    table = TeacherStore(stores["fraction"]).parts[0].samples
    assert table.column("has_question_features").to_pylist() == [has[i] for i in table.column("sample_id").to_pylist()]
    assert (table.column("num_question").to_numpy() > 0).tolist() == table.column("has_question_features").to_pylist()


def test_changing_the_fraction_on_resume_is_refused_naming_it(zoo, demo_manifest, stores):
    for flags in (("--question-features-fraction", "0.25"), ()):  # another fraction, and the default (1)
        done = _cache(zoo, demo_manifest, stores["fraction"], *flags)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "--question-features-fraction 0.5" in done.stderr and "new --output" in done.stderr, done.stderr


@pytest.mark.parametrize("flags, says", [(("--question-features-fraction", "0"), "must be in (0, 1]"),
                                         (("--question-features-fraction", "1.5"), "must be in (0, 1]")])
def test_a_bad_fraction_is_refused(zoo, demo_manifest, tmp_path, flags, says):
    done = _cache(zoo, demo_manifest, tmp_path / "s", *flags)
    assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
    job = [a for a in _job(zoo, demo_manifest, tmp_path / "t", "--question-features-fraction", "0.5")
           if a != "--question-features"]
    done = run_command("cache-teacher", *job, env=ENV, timeout=600)
    assert done.returncode == 2 and "add --question-features" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_inspect_cache_shows_the_fraction_and_what_it_saved_and_verify_checks_the_subset(stores):
    done = run_command("inspect-cache", "--store", stores["fraction"], "--json", env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s, full = json.loads(done.stdout)["summary"], summary(TeacherStore(stores["full"]))
    kept = sum(carries_question_features(sid, F) for p in TeacherStore(stores["fraction"]).parts
               for sid in p.samples.column("sample_id").to_pylist())
    assert s["question_features_fraction"] == F and s["samples_with_question_features"] == kept
    on_disk = [x["parts"][0]["arrays"]["question_features"]["bytes_on_disk"] for x in (full, s)]
    assert s["question_feature_bytes_saved"] == pytest.approx(on_disk[0] - on_disk[1], rel=0.15)
    text = run_command("inspect-cache", "--store", stores["fraction"], env=ENV, timeout=300).stdout
    assert f"question features for a fraction 0.5 of the samples ({kept} of {s['samples']};" in text, text
    done = run_command("inspect-cache", "--store", stores["fraction"], "--verify", env=ENV, timeout=300)
    assert done.returncode == 0 and "verify: OK" in done.stdout, done.stdout + done.stderr[-2000:]


def test_store_bytes_on_paper_are_the_stores_array_bytes(stores):
    """`store_bytes` of a store's own counts is the byte count of its arrays, to the byte."""
    for path in stores.values():
        s = summary(TeacherStore(path))
        n = s["samples"]
        shape = StoreShape(n, s["label_tokens"] / n, (s["tokens"] - s["label_tokens"]) / n, s["teacher"]["hidden_size"],
                           "float32", s["topk"], question_fraction=s["question_tokens"] / (s["tokens"] - s["label_tokens"]))
        assert store_bytes(shape)["total"] == pytest.approx(s["array_bytes"], rel=1e-9)


def test_the_sizing_table_of_store_md_is_what_the_function_gives():
    table = sizing_table(665_000, 80e6 / 665_000, 400e6 / 665_000, (1.0, 0.25, 0.1))
    assert table in (ROOT / "docs" / "store.md").read_text()
    assert "| 8192 | bfloat16 | 1.2 TiB | 7.2 TiB |" in table  # the estimate: ~1.3 TB, ~8 TB


def _trainer(store: Path, zoo, tmp_path: Path) -> Trainer:
    cfg = TrainConfig(store=store, student=str(zoo["idefics3"]), output=tmp_path / "out", stage="1", batch_size=4,
                      heldout_fraction=0.0, reliance_every=0, report_to="none", device="cpu", progress=False,
                      max_steps=1, eval_every=0, command=["t"])
    return Trainer(cfg, 1, None)


def test_the_regularizer_is_divided_by_the_label_tokens_of_the_samples_that_have_question_features(stores, zoo,
                                                                                                   tmp_path):
    with _trainer(stores["fraction"], zoo, tmp_path) as t:
        batch = pairs(t.store, t.renderer, lambda sid: True, 8)
        kept = [s for s in batch if s.teacher.question_features is not None]
        assert 0 < len(kept) < len(batch)
        t.student.eval()
        t.recal.eval()
        with torch.no_grad():
            counts = t.forward.counts(batch)
            assert counts.regularizer == sum(len(s.teacher.targets) for s in kept) < counts.teacher
            parts = t.forward(batch, counts)
            # by hand: each kept sample's summed token losses (its pass divided by 1), over their label tokens
            summed = [float(t.forward([s], Counts(1, 1, 1))["reg"]) for s in kept]
            assert float(parts["reg"]) == pytest.approx(sum(summed) / counts.regularizer, rel=1e-5)
            alone = [s for s in batch if s.teacher.question_features is None]
            assert float(t.forward(alone, t.forward.counts(alone).at_least_one())["reg"]) == 0.0
            assert np.isfinite(float(parts["recal"])) and float(parts["recal"]) > 0


def test_train_student_trains_from_a_fraction_store(stores, zoo, tmp_path):
    done = run_command("train-student", "--store", stores["fraction"], "--student", zoo["idefics3"], "--output",
                       tmp_path / "run", "--stage", "1", "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
                       "--no-progress", "--reliance-every", "0", "--eval-every", "0", env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the regularizer trains on the" in done.stdout and "(--question-features-fraction 0.5)" in done.stdout
    recs = [json.loads(x) for x in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reg", 0) > 0 for r in recs), recs
