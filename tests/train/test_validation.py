"""Validation during training (`--eval-every`, every stage's end): the stage's losses on the held-out samples, equal
to a forward of the same samples done here; in stages that train the student its greedy answers, scored as
eval-student scores them (against answers built from the student's own, so the scores are known); `--keep-best`
keeps the model of the best value logged, also across a resume; `--heldout-fraction 0` skips it and says so."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cache.core.models import head_scaling
from genrecal_cache.data.render import Renderer
from genrecal_cache.store.reader import TeacherStore
from genrecal_train import checkpoint
from genrecal_train.config import BestMetric, Method, TrainConfig
from genrecal_train.data import is_heldout, pairs
from genrecal_train.evaluate import EvalConfig, evaluate, normalise
from genrecal_train.forward import Counts
from genrecal_train.stages import StagePlan
from genrecal_train.trainer import Trainer, train
from genrecal_train.validation import SCORES, metrics_of
from tests import warm
from tests.helpers import ROOT, command_env, run_command

from .test_trainer import _store

FRACTION = 0.4  # holds out 6 of the 12 clean rows (demo-3, 5, 7, 8, 9, 11)
STUDENT_STAGE_KEYS = {"val_loss", "val_student", "val_samples", "val_answers", *SCORES}


@pytest.fixture(scope="module")
def known(zoo, clean_manifest, tmp_path_factory) -> dict:
    """A store whose last answers are the untrained student's own greedy answers (max 4 tokens), verbatim, re-cased
    with a full stop, or wrong, by row; and the scores its held-out rows must get while the student is unchanged."""
    probe = tmp_path_factory.mktemp("probe") / "probe.jsonl"
    evaluate(EvalConfig(student=str(zoo["idefics3"]), manifest=clean_manifest, output=probe, max_new_tokens=4,
                        progress=False, device="cpu"))
    preds = {p["id"]: p["prediction"] for p in map(json.loads, probe.read_text().splitlines())}
    rows, golds = [json.loads(x) for x in clean_manifest.read_text().splitlines()], {}
    for i, row in enumerate(rows):
        pred = preds[row["id"]]
        golds[row["id"]] = gold = [pred, pred.upper() + " .", "certainly not " + pred][i % 3]
        if "messages" in row:
            last = max(j for j, m in enumerate(row["messages"]) if m["role"] == "assistant")
            row["messages"][last]["content"] = gold
        else:
            row["conversations"][-1]["value"] = gold
    manifest = clean_manifest.parent / "validation-known.jsonl"  # beside the images it names
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    held = [sid for sid in golds if is_heldout(sid, FRACTION)]
    assert len(held) == 6 and all(preds[sid] for sid in held)
    return {"store": _store(zoo, manifest, tmp_path_factory.mktemp("validation") / "store"), "held": held,
            "exact": sum(golds[s].strip() == preds[s] for s in held) / len(held),
            "normalised": sum(normalise(golds[s]) == normalise(preds[s]) for s in held) / len(held)}


def _train(store: Path, student: Path, out: Path, *extra: object, stage: str = "3"):
    return run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", stage,
                       "--batch-size", "4", "--heldout-fraction", FRACTION, "--eval-max-new-tokens", "4",
                       "--log-every", "1", "--reliance-every", "0", "--report-to", "none", "--device", "cpu",
                       "--no-progress", *extra, env={"OMP_NUM_THREADS": "1"}, drop_env=["GENRECAL_KILL_AT"],
                       timeout=900)


def _records(out: Path, stage: int, key: str = "val_loss") -> list[dict]:
    recs = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if key in r]


def _val_keys(rec: dict) -> set[str]:
    return {k for k in rec if k.startswith("val_")}


@torch.no_grad()
def _student_loss(student: Path, store: Path) -> float:
    """The reference: the student's cross-entropy on its answer tokens of every held-out sample, from a plain
    transformers forward each, averaged over all those tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(student).eval()
    scale, softcap = head_scaling(model.config)
    assert scale in (None, 1.0) and softcap is None  # the tiny Idefics3 has plain logits
    samples = pairs(TeacherStore(store), Renderer(AutoProcessor.from_pretrained(student)),
                    lambda sid: is_heldout(sid, FRACTION), 100)
    total, count = 0.0, 0
    for s in samples:
        logits = model(**s.student.inputs).logits[0]
        pos = torch.from_numpy(s.student.label_positions)
        targets = torch.from_numpy(s.student.input_ids)[pos + 1]
        total += float(torch.nn.functional.cross_entropy(logits[pos].float(), targets, reduction="sum"))
        count += len(pos)
    return total / count


def test_validation_runs_every_n_steps_and_at_the_end_and_scores_answers_as_eval_student(known, zoo, tmp_path):
    """--lr 0 (the student stays as it is): at steps 2 and 3 (the end) the held-out scores are the known ones, and
    val_loss is the student's own cross-entropy on those samples computed here. --keep-best by a score keeps step 2
    (a tie is not better) and, through a resume to step 4, still does: the best survives in the checkpoint."""
    out = tmp_path / "run"
    done = _train(known["store"], zoo["idefics3"], out, "--max-steps", "3", "--epochs", "2", "--eval-every", "2",
                  "--lr", "0", "--lr-end", "0", "--keep-best", "val_normalised_match")
    assert done.returncode == 0, done.stderr[-3000:]
    recs = _records(out, 3)
    assert [r["step"] for r in recs] == [2, 3] and all(_val_keys(r) == STUDENT_STAGE_KEYS for r in recs), recs
    for r in recs:
        assert r["val_samples"] == r["val_answers"] == 6
        assert r["val_exact_match"] == pytest.approx(known["exact"]) and known["exact"] > 0
        assert r["val_normalised_match"] == pytest.approx(known["normalised"]) and known["normalised"] > known["exact"]
    assert recs[0]["val_loss"] == recs[1]["val_loss"] == recs[0]["val_student"]
    assert recs[0]["val_loss"] == pytest.approx(_student_loss(zoo["idefics3"], known["store"]), rel=1e-5)
    assert "step 3: val_loss" in done.stdout

    assert [r["step"] for r in _records(out, 3, "best_metric")] == [2]
    assert checkpoint.read_state(out / "stage3" / "checkpoint")["validation"]["best"]["step"] == 2
    again = _train(known["store"], zoo["idefics3"], out, "--max-steps", "4", "--epochs", "2", "--eval-every", "2",
                   "--lr", "0", "--lr-end", "0", "--keep-best", "val_normalised_match", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in _records(out, 3)] == [2, 3, 4]
    assert [r["step"] for r in _records(out, 3, "best_metric")] == [2], "the best was forgotten on resume"


@pytest.mark.parametrize("lora", [0, 4])
def test_keep_best_keeps_the_model_of_the_lowest_logged_val_loss(known, zoo, tmp_path, lora):
    """Validated every step with a large learning rate: the best/ student (loadable with transformers) has the
    lowest val_loss logged, computed again here from its weights; final/ has the last; `best_value` records fall.
    With LoRA, best/ merges a copy: the adapters go on training (every val_loss differs)."""
    out = tmp_path / "run"
    done = _train(known["store"], zoo["idefics3"], out, "--max-steps", "4", "--eval-every", "1", "--lr", "3e-2",
                  "--lr-end", "3e-2", "--epochs", "2", "--keep-best", "val_loss", "--lora-rank", lora)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [r["val_loss"] for r in _records(out, 3)]
    assert len(logged) == 4 and len(set(logged)) == 4, logged
    bests = [r["best_value"] for r in _records(out, 3, "best_value")]
    assert bests == sorted(bests, reverse=True) and bests[-1] == min(logged) and bests[0] == logged[0]
    state = checkpoint.read_state(out / "stage3" / "checkpoint")["validation"]["best"]
    assert state["value"] == min(logged) and state["step"] == 1 + logged.index(min(logged))
    assert _student_loss(out / "stage3" / "best" / "student", known["store"]) == pytest.approx(min(logged), rel=1e-5)
    assert _student_loss(out / "stage3" / "final" / "student", known["store"]) == pytest.approx(logged[-1], rel=1e-5)
    best, final = (load_file(out / "stage3" / d / "student" / "model.safetensors") for d in ("best", "final"))
    assert all(torch.equal(best[k], final[k]) for k in best) == (state["step"] == 4)
    assert not (out / "stage3" / "best" / "recalibrator").exists()


def test_every_stage_validates_its_own_losses_and_only_student_stages_answer(known, zoo, tmp_path):
    """--stage all: stage 1 logs the Recalibrator's losses (no answers: the student does not train) and keeps no best
    by an answer score, saying so once; stages 2 and 3 answer and keep best/. Stage 2's losses equal one no-grad
    forward of all held-out samples at once, in eval mode, with the checkpoint's weights."""
    out = tmp_path / "run"
    done = _train(known["store"], zoo["idefics3"], out, "--max-steps", "2", "--eval-every", "0", "--lr", "1e-3",
                  "--keep-best", "val_normalised_match", stage="all")
    assert done.returncode == 0, done.stderr[-3000:]
    recal = {"val_recal", "val_ar", "val_kl", "val_reg", "val_reg_ar", "val_reg_kl"}
    expected = {1: {"val_loss", "val_samples", *recal}, 2: STUDENT_STAGE_KEYS | recal, 3: STUDENT_STAGE_KEYS}
    for stage, keys in expected.items():
        recs = _records(out, stage)
        assert [r["step"] for r in recs] == [2] and _val_keys(recs[0]) == keys, (stage, recs)
    assert done.stdout.count("--keep-best val_normalised_match: this stage does not compute it") == 1, done.stdout
    assert "stage 1: --keep-best" in done.stdout and not (out / "stage1" / "best").exists()
    assert (out / "stage2" / "best" / "recalibrator").is_dir() and (out / "stage3" / "best" / "student").is_dir()
    logged = _records(out, 2)[0]

    cfg = TrainConfig(store=known["store"], student=str(zoo["idefics3"]), output=out, stage="all", batch_size=4,
                      heldout_fraction=FRACTION, eval_max_new_tokens=4, log_every=1, reliance_every=0,
                      report_to="none", device="cpu", progress=False, max_steps=2, eval_every=0, lr=1e-3,
                      keep_best="val_normalised_match", resume=True, command=["t"])
    with Trainer(cfg, 2, str(out / "stage1" / "final" / "student")) as t:
        assert t.step == 2
        samples = pairs(t.store, t.renderer, lambda sid: is_heldout(sid, FRACTION), 100)
        n_teacher = sum(len(s.teacher.targets) for s in samples)
        n_student = sum(int(s.student.label_mask.sum()) for s in samples)
        t.student.eval()
        t.recal.eval()
        with torch.no_grad():
            # every sample keeps its question features: the regularizer is divided by every label token too
            parts = {f"val_{k}": float(v) for k, v in t.forward(samples, Counts(n_teacher, n_student, n_teacher)
                                                                 ).items()}
    assert len(samples) == logged["val_samples"] == 6 and parts.keys() == _val_keys(logged) - {
        "val_loss", "val_samples", "val_answers", *SCORES}
    for k, v in parts.items():
        assert logged[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert logged["val_loss"] == pytest.approx(parts["val_student"] + parts["val_recal"] + parts["val_reg"], rel=1e-6)


def test_heldout_fraction_zero_trains_on_everything_and_says_there_is_no_validation(known, zoo, tmp_path):
    out = tmp_path / "run"
    done = run_command("train-student", "--store", known["store"], "--student", zoo["idefics3"], "--output", out,
                       "--stage", "3", "--batch-size", "12", "--max-steps", "1", "--heldout-fraction", "0",
                       "--eval-every", "1", "--report-to", "none", "--device", "cpu", "--no-progress",
                       env={"OMP_NUM_THREADS": "1"}, drop_env=["GENRECAL_KILL_AT"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("--heldout-fraction 0: training on every sample") == 1, done.stdout
    recs = [json.loads(x) for x in (out / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert not [k for r in recs for k in r if k.startswith("val_")]
    store = TeacherStore(known["store"])
    teacher_tokens = sum(int(n) for p in store.parts for n in p.samples.column("num_labels").to_pylist())
    assert [r["tokens"] for r in recs if "tokens" in r] == [teacher_tokens], "not every sample was trained on"


def test_keep_best_is_checked_before_training(known, zoo, tmp_path):
    """A name that is no metric, one no stage of the command computes, and one with nothing held out: exit 2,
    naming --keep-best, before any model is loaded."""
    for extra, message in ((["--keep-best", "val_acc"], "Invalid value for '--keep-best'"),
                           (["--method", "sft", "--keep-best", "val_recal"],
                            "--keep-best val_recal: no stage this command trains computes it (--method sft, stage 3); "
                            "choose one of val_loss, val_student, val_exact_match, val_normalised_match"),
                           (["--keep-best", "val_loss", "--heldout-fraction", "0"],
                            "--keep-best val_loss ranks checkpoints on held-out samples, and --heldout-fraction is 0"),
                           (["--keep-best", "val_exact_match", "--eval-samples", "0"],
                            "--keep-best val_exact_match scores the student's answers, and --eval-samples is 0")):
        done = run_command("train-student", "--store", known["store"], "--student", zoo["idefics3"], "--output",
                           tmp_path / "run", "--stage", "all", *extra, env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "run" / "stage1").exists()


def test_validation_changes_nothing_in_training(known, zoo, tmp_path):
    """A student with dropout: validating every step (in eval mode, drawing nothing from training's generators)
    leaves the training losses exactly those of a run that validates only at its end."""
    student = shutil.copytree(zoo["idefics3"], tmp_path / "student")
    config = json.loads((student / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.3
    (student / "config.json").write_text(json.dumps(config))
    losses = {}
    for every in (0, 1):
        out = tmp_path / f"every{every}"
        train(TrainConfig(store=known["store"], student=str(student), output=out, stage="3", batch_size=3,
                          max_steps=3, epochs=2, lr=1e-3, heldout_fraction=FRACTION, eval_every=every,
                          eval_max_new_tokens=2, log_every=1, reliance_every=0, report_to="none", device="cpu",
                          progress=False, command=["t"]))
        losses[every] = [r["loss"] for r in _records(out, 3, "loss")]
        assert [r["step"] for r in _records(out, 3)] == ([3] if every == 0 else [1, 2, 3])
    assert len(losses[0]) == 3 and losses[0] == losses[1], losses


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_validate_as_one_does(known, zoo, tmp_path, parallel):
    """Under torchrun every rank runs validation's forwards (FSDP gathers the layers in each, also while generating:
    every rank answers the same prompts in step); rank 0 logs the numbers one process computes, and best/ holds the
    whole student (--lr 0: the student as it started)."""
    out = tmp_path / "run"
    args = ["--store", known["store"], "--student", zoo["idefics3"], "--output", out, "--stage", "3", "--batch-size",
            "2", "--max-steps", "2", "--eval-every", "1", "--lr", "0", "--lr-end", "0", "--heldout-fraction", FRACTION,
            "--eval-max-new-tokens", "4", "--keep-best", "val_loss", "--reliance-every", "0", "--report-to", "none",
            "--device", "cpu", "--no-progress", *(["--fsdp"] if parallel == "fsdp" else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "genrecal_train.cli", *map(str, args)]
    done = warm.run(cmd, command_env({"OMP_NUM_THREADS": "1"}, ["GENRECAL_KILL_AT"]), cwd=ROOT,
                    capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    recs = _records(out, 3)
    assert [r["step"] for r in recs] == [1, 2] and all(_val_keys(r) == STUDENT_STAGE_KEYS for r in recs), recs
    assert recs[0]["val_loss"] == pytest.approx(_student_loss(zoo["idefics3"], known["store"]), rel=1e-5)
    assert recs[0]["val_exact_match"] == pytest.approx(known["exact"])
    assert recs[0]["val_normalised_match"] == pytest.approx(known["normalised"])
    best, base = (load_file(d / "model.safetensors") for d in (out / "stage3" / "best" / "student", zoo["idefics3"]))
    assert best.keys() == base.keys() and all(torch.equal(best[k], base[k]) for k in base)


def test_keep_best_names_exactly_what_stages_compute():
    """--keep-best's choices are the union of every stage's validation metrics, of every method."""
    computed = {m for method in Method for stage in (1, 2, 3) for freeze in (False, True)
                for m in metrics_of(StagePlan.make(stage, method, freeze_recalibrator=freeze), True, True)}
    assert {m.value for m in BestMetric} == computed
