"""eval-student: greedy answers scored against the last assistant turn, exactly and normalised."""

from __future__ import annotations

import json

from genrecal_train.evaluate import EvalConfig, evaluate, normalise


def test_normalise():
    assert normalise("  The Seven!! ") == "seven" and normalise("an Eight, two.") == "eight two"


def test_scores_a_known_answer_set(zoo, clean_manifest, tmp_path):
    """Gold answers set to the model's own greedy answers (verbatim, re-cased, or wrong) must score 1/3 exact
    and 2/3 normalised."""
    probe = tmp_path / "probe.jsonl"
    evaluate(EvalConfig(student=str(zoo["llava"]), manifest=clean_manifest, output=probe, max_new_tokens=4,
                        max_samples=6, progress=False, device="cpu"))
    preds = [json.loads(x) for x in probe.read_text().splitlines()]
    assert len(preds) == 6 and all(p["prediction"] for p in preds)
    rows = [json.loads(x) for x in clean_manifest.read_text().splitlines()][:6]
    for i, (row, p) in enumerate(zip(rows, preds)):
        gold = [p["prediction"], p["prediction"].upper() + " .", "certainly not " + p["prediction"]][i % 3]
        if "messages" in row:
            last = max(j for j, m in enumerate(row["messages"]) if m["role"] == "assistant")
            row["messages"][last]["content"] = gold
        else:
            row["conversations"][-1]["value"] = gold
    known = clean_manifest.parent / "known.jsonl"
    known.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = evaluate(EvalConfig(student=str(zoo["llava"]), manifest=known, max_new_tokens=4, progress=False,
                              device="cpu"))
    assert res["samples"] == 6 and res["skipped"] == 0
    assert abs(res["exact_match"] - 2 / 6) < 1e-9 and abs(res["normalised_match"] - 4 / 6) < 1e-9, res
