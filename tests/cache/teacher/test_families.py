"""The family matrix: each model family as teacher and as student, end to end on tiny models built from configs.

Per family: cache-teacher (transformers, and vLLM where it runs the family) -> head(stored features) equals the
teacher's own logits on the stored ids and images -> train-student a few steps (the CLI) -> the saved student
reloads with transformers and generates (eval-student's evaluation). By default each family added for the matrix is
once teacher and once student (a ring of pairs) and one vLLM job caches the families vLLM runs; the full
teacher x student cross product is `slow`. README.md, "Tested model families", summarises what this checks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_zoo import FAMILY_NAMES

from genrecal_cache.core.models import is_multimodal, load_model, load_processor
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_train.config import TrainConfig
from genrecal_train.data import pair
from genrecal_train.models import vision_parameter_names
from genrecal_train.trainer import train
from tests.helpers import ROOT, run_command

VLMS = ("llava", "idefics3", "qwen2vl", "gemma3", "internvl", "mllama")
TEXT = ("textlm", "granite")
# By default each new family is once teacher and once student (teacher, student).
RING = [("gemma3", "internvl"), ("internvl", "mllama"), ("mllama", "gemma3"), ("textlm", "granite"),
        ("granite", "textlm")]
# A student reads a VLM teacher's image samples only if it takes images; any student reads a text teacher's.
PAIRS = [(t, s) for t in VLMS for s in VLMS] + [(t, s) for t in TEXT for s in VLMS + TEXT]
VLLM_FAMILIES = ("gemma3", "internvl", "granite", "idefics3")  # test_vllm.py covers llava, qwen2vl, textlm
HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the whole environment of each command (`inherit_env=False`)


@pytest.fixture(scope="module")
def models(zoo, family_zoo) -> dict[str, Path]:
    return {**zoo, **family_zoo}


def _manifest(name: str, clean_manifest: Path, text_manifest: Path) -> Path:
    return text_manifest if name in TEXT else clean_manifest


def _cfg(teacher: Path, manifest: Path, out: Path, backend: str) -> CacheConfig:
    return CacheConfig(teacher=str(teacher), manifest=manifest, output=out, backend=backend, dtype="float32",
                       device="cpu", question_features=True, max_length=1024, render_workers=0, progress=False,
                       command=["t"])


@pytest.fixture(scope="module")
def hf_store(models, clean_manifest, text_manifest, tmp_path_factory):
    """`hf_store(name)`: that family's store from the transformers backend, cached once per module."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in made:
            out = root / f"hf-{name}"
            res = run_cache(_cfg(models[name], _manifest(name, clean_manifest, text_manifest), out, "hf"))
            assert res.samples > 0 and res.rejects == 0, res.top_reasons(5)
            made[name] = out
        return made[name]

    return get


def test_family_zoo_reloads_with_head_dim_32_and_tokenizers_of_its_own(models, family_zoo):
    """Each new family reloads without missing weights, has head_dim >= 32 (vLLM's CPU attention), a vision
    encoder the trainer can freeze, and a tokenizer that no other family shares."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    text = "What digit is this? seven"
    ids = set()
    for name, path in models.items():
        proc = load_processor(path)
        tok = getattr(proc, "tokenizer", proc)
        ids.add(tuple(tok(text, add_special_tokens=False)["input_ids"]))
        if name not in family_zoo:
            continue
        cls = AutoModelForImageTextToText if name in VLMS else AutoModelForCausalLM
        model, info = cls.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        if name in VLMS:  # stages 2-3 find its vision encoder to freeze, and not the whole model
            assert 0 < len(vision_parameter_names(model)) < len(list(model.parameters())), name
        cfg = json.loads((path / "config.json").read_text())
        text_cfg = cfg.get("text_config", cfg)
        assert (text_cfg.get("head_dim") or text_cfg["hidden_size"] // text_cfg["num_attention_heads"]) >= 32
    assert len(ids) == len(models), "two families share a tokenizer"


@pytest.mark.parametrize("family", [*FAMILY_NAMES, *(pytest.param(f, marks=pytest.mark.slow)
                                            for f in ("llava", "idefics3", "qwen2vl", "textlm"))])
def test_head_of_features_is_the_teachers_own_logits(family, models, hf_store):
    """The stored head applied to the stored features gives the logits the transformers model computes on the
    stored ids with the same images: scaled for Granite (logits_scaling), and not softcapped for Gemma 3, whose
    text config has a softcap that Gemma3ForConditionalGeneration does not apply."""
    store = TeacherStore(hf_store(family))
    assert len(store) > 0, f"{family}: the store holds no sample to compare"
    head, meta = store.teacher_head(), store.meta["head"]
    loaded = load_model(str(models[family]))
    model, renderer = loaded.model.eval(), Renderer(loaded.processor)
    if family == "granite":
        assert meta["logit_scale"] == 0.25
    if family == "gemma3":
        assert model.config.get_text_config().final_logit_softcapping == 3.0 and meta["softcap"] is None
    for i in range(len(store)):
        t = store[i]
        r = pair(t, renderer, store.path).student  # the teacher's own rendering, images included
        assert torch.equal(torch.from_numpy(r.input_ids), t.token_ids), t.sample_id
        with torch.no_grad():
            theirs = model(**r.inputs).logits[0][t.label_positions]  # (A, V): what the teacher itself computes
        ours = head.logits(t.features)
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), (family, t.sample_id)


def _train_cli(store: Path, student: Path, out: Path) -> None:
    done = run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", "all",
                       "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--heldout-fraction", "0",
                       "--reliance-every", "0", "--log-every", "1", "--report-to", "none", "--device", "cpu",
                       "--no-progress", env=ENV, inherit_env=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in (1, 2, 3):
        recs = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        assert steps and all(math.isfinite(r["loss"]) for r in steps), (stage, recs)
        assert all(r["student_rejects"] == 0 for r in steps), (stage, recs)  # the student took every sample


def _reloads_and_generates(path: Path, manifest: Path) -> None:
    """The saved student loads with transformers (no missing or unexpected weights) and answers the manifest's
    first prompt, its images included."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    proc = load_processor(path)
    cls = AutoModelForImageTextToText if is_multimodal(proc) else AutoModelForCausalLM
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sample = parse_row(Row(0, json.loads(manifest.read_text().splitlines()[0])), manifest.parent)
    r = Renderer(proc).render_prompt(sample)
    out = model.eval().generate(**r.inputs, max_new_tokens=3, do_sample=False)
    assert 1 <= out.shape[1] - len(r.input_ids) <= 3


@pytest.mark.parametrize(("teacher", "student"), RING, ids=[f"{t}->{s}" for t, s in RING])
def test_cache_train_reload_generate(teacher, student, models, hf_store, clean_manifest, text_manifest, tmp_path):
    """As users run it: train-student (all three stages, two steps each) from the teacher's store, then
    eval-student's evaluation of the saved student (in this process: the command's own run is
    tests/train/test_evaluate.py's and the README quick start's)."""
    from genrecal_train.evaluate import EvalConfig, evaluate

    manifest = _manifest(teacher, clean_manifest, text_manifest)
    _train_cli(hf_store(teacher), models[student], tmp_path / "run")
    final = tmp_path / "run" / "stage3" / "final" / "student"
    _reloads_and_generates(final, manifest)
    evaluate(EvalConfig(student=str(final), manifest=manifest, max_samples=2, max_new_tokens=3,
                        output=tmp_path / "preds.jsonl", device="cpu", progress=False, command=["test"]))
    preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all(isinstance(p["prediction"], str) for p in preds)


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "student"), PAIRS, ids=[f"{t}->{s}" for t, s in PAIRS])
def test_every_teacher_with_every_student(teacher, student, models, hf_store, clean_manifest, text_manifest,
                                          tmp_path):
    """The cross product, in process: one step of each stage, then the saved student reloads and generates."""
    outs = train(TrainConfig(store=hf_store(teacher), student=str(models[student]), output=tmp_path, stage="all",
                             max_steps=1, batch_size=4, heldout_fraction=0.0, reliance_every=0, log_every=1,
                             report_to="none", progress=False, device="cpu", command=["t"]))
    assert len(outs) == 3
    recs = [json.loads(x) for x in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and math.isfinite(r["loss"]) and r["student_rejects"] == 0 for r in recs), recs
    _reloads_and_generates(tmp_path / "stage3" / "final" / "student",
                           _manifest(teacher, clean_manifest, text_manifest))


def test_mllama_on_vllm_is_refused_in_one_line(models, clean_manifest, tmp_path):
    """vLLM no longer runs mllama (cross-attention images): cache-teacher says so and names --backend hf."""
    done = run_command("cache-teacher", "--teacher", models["mllama"], "--manifest", clean_manifest, "--output",
                       tmp_path / "s", "--backend", "vllm", "--device", "cpu", "--no-progress", env=ENV,
                       inherit_env=False, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cross-attention" in done.stderr and "--backend hf" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


# --- vLLM: one subprocess caches every family in turn, each engine eager and in process (a few seconds each
# instead of the ~40 s that starting an engine's processes costs on two cores).

def _vllm_job(spec_file: str) -> None:
    """Run as `python -m tests.cache.teacher.test_families SPEC` with VLLM_ENABLE_V1_MULTIPROCESSING=0: cache each
    job of SPEC with the vLLM backend, writing {name: {samples, rejects} or {error}} to SPEC's results file."""
    from genrecal_cache.teacher.vllm import VLLMTeacher

    spec = json.loads(Path(spec_file).read_text())
    results = {}
    for name, job in spec["jobs"].items():
        try:
            # On CPU gpu_memory_utilization is the share of RAM the engine reserves.
            teacher = VLLMTeacher(job["teacher"], "float32", max_model_len=1024, gpu_memory_utilization=0.1,
                                  enforce_eager=True, distributed_executor_backend="uni")
            try:
                res = run_cache(_cfg(Path(job["teacher"]), Path(job["manifest"]), Path(job["output"]), "vllm"),
                                teacher)
            finally:
                teacher.close()
            results[name] = {"samples": res.samples, "rejects": res.rejects}
        except Exception as e:  # reported per family by the test that reads it
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    Path(spec["results"]).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def vllm_stores(models, clean_manifest, text_manifest, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("vllm-families")
    jobs = {name: {"teacher": str(models[name]), "output": str(root / name),
                   "manifest": str(_manifest(name, clean_manifest, text_manifest))} for name in VLLM_FAMILIES}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "results": str(root / "results.json")}))
    # This file as a module; tools/ on its path as pytest's `pythonpath` puts it on the tests' (`import tiny_zoo`).
    path = os.pathsep.join(p for p in (str(ROOT / "tools"), ENV.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", __name__, str(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return {name: dict(results[name], path=root / name) for name in VLLM_FAMILIES}


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (make vllm)")
@pytest.mark.parametrize("family", VLLM_FAMILIES)
def test_vllm_store_equals_the_transformers_store(family, models, vllm_stores, hf_store):
    """Same ids, targets and head as the transformers backend, features within 1e-4. Gemma 3 on vLLM's CPU
    build is the exception: its CPU attention has no bidirectional attention between image tokens (Gemma 3's
    image tokens see each other), so features agree up to the first image token and differ after it."""
    from tests.cache.teacher.test_vllm import assert_close_stores

    got = vllm_stores[family]
    assert "error" not in got, got["error"]
    assert got["samples"] > 0 and got["rejects"] == 0, got
    if family != "gemma3":
        assert_close_stores(hf_store(family), got["path"])
        return
    a, b = TeacherStore(hf_store(family)), TeacherStore(got["path"])
    image_token = json.loads((models[family] / "config.json").read_text())["image_token_index"]
    assert len(a) == len(b) > 0 and torch.equal(a.head("weight"), b.head("weight"))
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x.token_ids, y.token_ids) and torch.equal(x.targets, y.targets)
        first = int((x.token_ids == image_token).nonzero()[0])  # the first image comes before any answer
        assert not x.label_mask[:first].any()
        assert (x.question_features[:first] - y.question_features[:first]).abs().max() <= 1e-4
        assert (x.features - y.features).abs().max() <= 1e-2


if __name__ == "__main__":
    _vllm_job(sys.argv[1])
