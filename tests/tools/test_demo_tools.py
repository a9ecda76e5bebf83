"""The demo's pieces that are not the product: digits VQA data, the experiment's summary, and `to_argv` (which
also starts the data-parallel copies of cache-teacher)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from genrecal_cache.core.config import command_from, to_argv
from genrecal_cache.core.errors import RejectError
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.job.config import CacheConfig

pytest.importorskip("sklearn")

from digits_vqa import WORDS, write_digits  # noqa: E402
from experiment import summarise, table  # noqa: E402


def test_digits_splits_are_disjoint_and_answered_right(tmp_path):
    from sklearn.datasets import load_digits

    paths = write_digits(tmp_path, gold=20, heldout=50, seed=3)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert (len(rows["heldout"]), len(rows["gold"]), len(rows["train"])) == (50, 20, 1797 - 50)
    ids = {k: {r["id"] for r in v} for k, v in rows.items()}
    assert not ids["heldout"] & ids["train"] and ids["gold"] | ids["pool"] == ids["train"]
    assert not ids["gold"] & ids["pool"]
    target = load_digits().target
    for r in rows["gold"] + rows["heldout"]:
        assert r["messages"][-1]["content"] == WORDS[target[int(r["id"].split("-")[1])]]
    pool = rows["pool"][0]
    assert pool["messages"][-1]["role"] == "user"
    parse_row(Row(0, pool), tmp_path, need_answer=False)  # the teacher writes its answer
    with pytest.raises(RejectError, match="no assistant turn"):
        parse_row(Row(0, pool), tmp_path)


def test_to_argv_rebuilds_the_config(tmp_path):
    cfg = CacheConfig(teacher="/m", manifest=tmp_path / "m.jsonl", output=tmp_path / "s", layers="1,3",
                      answers="generate", gen_temperature=0.7, question_features=True, shard="1/4",
                      max_length=0, progress=False, command=["x"])
    seen = []
    import typer

    app = typer.Typer()
    app.command()(command_from(CacheConfig, seen.append))
    res = CliRunner().invoke(app, to_argv(cfg))
    assert res.exit_code == 0, res.output
    assert dataclasses.replace(seen[0], command=cfg.command) == cfg
    assert to_argv(cfg, changed_only=True)[:2] == ["--teacher", "/m"]
    assert "--topk" not in to_argv(cfg, changed_only=True)


def test_experiment_summary_pairs_seeds_with_the_fair_baseline():
    rows = [{"size": 300, "arm": arm, "seed": s, "accuracy": acc, "s1_own": "", "s1_shuffled": ""}
            for arm, accs in (("sft-teacher", (0.5, 0.6)), ("genrecal", (0.55, 0.58)), ("uld", (0.56, 0.57)))
            for s, acc in enumerate(accs)]
    out = {r["arm"]: r for r in summarise(rows)}
    assert out["uld"]["delta_vs_genrecal"] == pytest.approx((0.01 - 0.01) / 2)
    assert out["uld"]["seeds_better_than_genrecal"] == 1 and out["uld"]["seeds_better"] == 1
    # ± is the sample SD (n - 1): 0.56, 0.57 -> 0.71 points; the deltas +6.0, -3.0 -> 6.36
    assert "| 300 | uld | 2 | 56.5 ± 0.7 | +1.5 ± 6.4 (1/2) | +0.0 ± 1.4 (1/2) |  |" in table(summarise(rows))
    assert out["genrecal"]["delta_vs_sft_teacher"] == pytest.approx((0.05 - 0.02) / 2)
    assert out["genrecal"]["seeds_better"] == 1 and out["genrecal"]["per_seed_delta"] == "+0.050 -0.020"
    assert out["sft-teacher"]["mean"] == pytest.approx(0.55)


def test_the_demo_prints_each_student_stage_s_last_validation_accuracy(tmp_path):
    """Read from each stage's metrics.jsonl: the last `val_normalised_match`; stage 1 (no answers) has none."""
    from digits_demo import validation_accuracy, validation_summary

    logs = {1: [{"step": 5, "val_loss": 2.0}],
            2: [{"step": 5, "val_loss": 1.5, "val_normalised_match": 0.125}, {"step": 5, "loss": 1.4},
                {"step": 10, "val_loss": 1.2, "val_normalised_match": 0.25}],
            3: [{"step": 10, "val_loss": 1.0, "val_normalised_match": 0.5}]}
    for stage, recs in logs.items():
        (tmp_path / f"stage{stage}").mkdir()
        (tmp_path / f"stage{stage}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert validation_accuracy(tmp_path) == {2: 0.25, 3: 0.5}
    assert validation_summary(tmp_path) == "stage 2 25.0%, stage 3 50.0%"
    assert validation_summary(tmp_path / "stage1") == "none logged"
