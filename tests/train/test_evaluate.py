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


def test_eval_student_reads_a_flat_vqa_table_through_a_column_mapping(zoo, clean_manifest, tmp_path):
    """The command as users run it, on an lmms-lab-style Parquet table (question / answers / image struct)."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import ROOT

    img = (clean_manifest.parent / "images" / "0000.png").read_bytes()
    table = pa.table({"qid": [1, 2], "query": ["What digit?", "Which digit is it?"], "answers": [["seven"], ["two"]],
                      "image": [{"bytes": img, "path": "a.png"}, {"bytes": img, "path": "b.png"}]})
    pq.write_table(table, tmp_path / "vqa.parquet")
    from pathlib import Path

    r = subprocess.run([str(Path(sys.executable).parent / "eval-student"), "--student", str(zoo["llava"]),
                        "--manifest", str(tmp_path / "vqa.parquet"), "--columns", "question=query,answer=answers,id=qid",
                        "--max-new-tokens", "2", "--output", str(tmp_path / "p.jsonl"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["samples"] == 2 and res["skipped"] == 0, res
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["1", "2"] and [p["gold"] for p in preds] == ["seven", "two"]


def test_eval_never_lets_the_student_write_image_placeholders(zoo, clean_manifest):
    """A student whose head favours the image token (as an untrained one may) still answers in text."""
    import torch

    from genrecal_cache.core.models import load_model
    from genrecal_cache.data.render import Renderer
    from genrecal_cache.data.rows import Row, parse_row
    from genrecal_train.evaluate import answer_ids

    loaded = load_model(str(zoo["llava"]))
    renderer = Renderer(loaded.processor)
    image_ids = renderer.image_token_ids
    assert loaded.processor.tokenizer.convert_tokens_to_ids("<image>") in image_ids
    row = json.loads(clean_manifest.read_text().splitlines()[0])
    prompt = renderer.render_prompt(parse_row(Row(0, row), clean_manifest.parent))
    model = loaded.model.eval()
    with torch.no_grad():  # point the head at the prompt's last hidden state: the image token's logit wins
        h = model.base_model(**prompt.inputs).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[image_ids[0]] = h
        first = model.generate(**prompt.inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
    assert first == image_ids[0], "the edited head does not favour the image token: the test cannot tell"
    ids = answer_ids(model, renderer, prompt.inputs, 3)
    assert ids and not set(ids) & set(image_ids), ids
