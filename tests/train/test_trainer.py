"""train-student end to end on a tiny teacher/student pair with different tokenizers and image-token counts
(Qwen2-VL teacher, Idefics3 student): stages, freezing, regularizer, reloadable outputs, and a stage that stops
rather than write nonsense (a non-finite loss, nothing to train on). Exact resume: test_resume.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cache.core.errors import ConfigError
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_train.config import TrainConfig
from genrecal_train.models import vision_parameter_names
from genrecal_train.trainer import Trainer, train
from tests.helpers import run_command


def _store(zoo, manifest, out, question_features=True) -> Path:
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=manifest, output=out, dtype="float32",
                          device="cpu", question_features=question_features, progress=False, command=["t"]))
    return out


@pytest.fixture(scope="module")
def store(zoo, demo_manifest, tmp_path_factory) -> Path:
    return _store(zoo, demo_manifest, tmp_path_factory.mktemp("train") / "store")


def _cfg(store, zoo, out, **kw) -> TrainConfig:
    base = dict(store=store, student=str(zoo["idefics3"]), output=out, batch_size=4, epochs=4, lr=1e-3,
                lr_end=1e-4, log_every=1, heldout_fraction=0.2, reliance_every=0, progress=False, device="cpu",
                command=["t"])
    base.update(kw)
    return TrainConfig(**base)


def _losses(out: Path, stage: int, key: str = "loss") -> list[float]:
    recs = [json.loads(x) for x in (out / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if key in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def trained(store, zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    train(_cfg(store, zoo, out))
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_loss_falls(trained, stage):
    losses = _losses(trained, stage)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.93 * first, losses


def test_each_stage_trains_only_what_it_should(trained, zoo):
    base = _weights(zoo["idefics3"])
    s1, s2, s3 = (_weights(trained / f"stage{k}" / "final" / "student") for k in (1, 2, 3))
    assert all(torch.equal(base[k], s1[k]) for k in base), "stage 1 changed the student"
    vision = {k for k in base if ".vision_model." in f".{k}"}
    assert vision and all(torch.equal(base[k], s2[k]) for k in vision), "stage 2 changed the vision tower"
    lm = [k for k in base if k not in vision and "lm_head" not in k and "embed_tokens" not in k]
    assert any(not torch.equal(base[k], s2[k]) for k in lm), "stage 2 left the language model unchanged"
    assert any(not torch.equal(s2[k], s3[k]) for k in lm)
    r1 = load_file(trained / "stage1" / "final" / "recalibrator" / "recalibrator.safetensors")
    r2 = load_file(trained / "stage2" / "final" / "recalibrator" / "recalibrator.safetensors")
    assert any(not torch.equal(r1[k], r2[k]) for k in r1), "stage 2 did not train the Recalibrator"
    assert not (trained / "stage3" / "final" / "recalibrator").exists()


def test_vision_parameters_are_found_for_every_zoo_vlm(zoo):
    from transformers import AutoModelForImageTextToText

    for name in ("llava", "idefics3", "qwen2vl"):
        model = AutoModelForImageTextToText.from_pretrained(zoo[name])
        names = vision_parameter_names(model)
        assert names and len(names) < len(list(model.named_parameters())), name


def test_regularizer_is_on_with_question_features_and_absent_without(store, zoo, demo_manifest, tmp_path):
    t = Trainer(_cfg(store, zoo, tmp_path / "a", max_steps=1), 1)
    assert t.use_regularizer
    t.run()
    assert _losses(tmp_path / "a", 1, "reg")[0] > 0
    off = Trainer(_cfg(store, zoo, tmp_path / "b", max_steps=1, regularizer=False), 1)
    off.run()
    assert not off.use_regularizer and not _losses(tmp_path / "b", 1, "reg")
    assert _losses(tmp_path / "a", 1)[0] != _losses(tmp_path / "b", 1)[0]
    bare = _store(zoo, demo_manifest, tmp_path / "bare", question_features=False)
    assert not Trainer(_cfg(bare, zoo, tmp_path / "c", max_steps=1), 1).use_regularizer


def test_saved_student_reloads_and_generates(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = trained / "stage3" / "final" / "student"
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                    add_generation_prompt=True, tokenize=False)
    ids = proc(text=[text], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 3 and isinstance(proc.decode(new), str)


def test_clear_errors(store, zoo, tmp_path):
    with pytest.raises(ConfigError, match="stage 2 needs a stage-1 Recalibrator.*--stage 1"):
        Trainer(_cfg(store, zoo, tmp_path / "x"), 2)
    with pytest.raises(ConfigError, match="--stage must be one of"):
        _cfg(store, zoo, tmp_path, stage="4")
    with pytest.raises(ConfigError, match="--student ./nope: no model there"):
        Trainer(_cfg(store, zoo, tmp_path / "y", student="./nope"), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stages_run_on_a_gpu_with_bf16_autocast(store, zoo, tmp_path):
    outs = train(_cfg(store, zoo, tmp_path, device="cuda", max_steps=3, epochs=1))
    assert len(outs) == 3
    for stage in (1, 2, 3):
        losses = _losses(tmp_path, stage)
        assert losses and all(x == x and x < 1e4 for x in losses), losses  # finite, no NaN


def test_a_recalibrator_for_another_teacher_is_refused(store, zoo, demo_manifest, trained, tmp_path):
    other = tmp_path / "other"
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=demo_manifest, output=other, dtype="bfloat16",
                          device="cpu", progress=False, command=["t"]))  # same teacher, other head digest (bf16)
    with pytest.raises(ConfigError, match="trained for teacher .*head_digest differs"):
        Trainer(_cfg(other, zoo, tmp_path / "o", stage="2",
                     recalibrator=trained / "stage1" / "final"), 2)


def test_pictures_of_a_run(trained, store, tmp_path):
    """Stage 1 keeps its starting Recalibrator; `inspect-cache --plot` draws start and end, and the loss curves
    draw every stage."""
    pytest.importorskip("sklearn")
    from genrecal_cache.store.reader import TeacherStore
    from genrecal_train.plot import feature_points, loss_curves
    from genrecal_train.recalibrator import Recalibrator

    start = Recalibrator.load(trained / "stage1" / "init" / "recalibrator")
    end = Recalibrator.load(trained / "stage1" / "final" / "recalibrator")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), end.state_dict().values()))
    pts = feature_points(TeacherStore(store), str(trained / "stage1" / "final" / "student"), end, limit=8)
    assert pts["student"].shape[0] == pts["teacher"].shape[0] == pts["recal_student"].shape[0] == 8
    assert pts["recal_student"].shape[1] == pts["teacher"].shape[1]
    assert len({tuple(x) for x in pts["teacher"].tolist()}) == 8, "a sample drawn twice"
    png = tmp_path / "f.png"
    done = run_command("inspect-cache", "--store", store, "--plot", png, "--student",
                       trained / "stage1" / "final" / "student", "--recalibrator",
                       trained / "stage1" / "init" / "recalibrator", "--recalibrator",
                       trained / "stage1" / "final" / "recalibrator", "--plot-samples", "12",
                       env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_curves(trained, tmp_path / "c.png").stat().st_size > 1000


def _train_cli(store, student, out, *extra: object):
    return run_command("train-student", "--store", store, "--student", student, "--output", out, "--stage", "1",
                       "--batch-size", "4", "--heldout-fraction", "0", "--save-every", "1", "--log-every", "1",
                       "--reliance-every", "0", "--report-to", "none", "--device", "cpu", "--no-progress", *extra,
                       env={"OMP_NUM_THREADS": "1"}, drop_env=["GENRECAL_KILL_AT"], timeout=900)


def test_a_non_finite_loss_stops_the_stage_naming_the_step_and_its_samples(store, zoo, tmp_path):
    """A NaN in one sample's stored features (written by the real writer, then one value changed in its zarr array):
    exit 2 at the step that meets it, naming the step, its samples and the one whose stored values are not finite,
    before the optimizer step; no final/ is written and every checkpoint holds finite weights."""
    import zarr

    from genrecal_cache.store.reader import TeacherStore

    bad = shutil.copytree(store, tmp_path / "store")
    part = TeacherStore(bad).parts[0]
    row = 5
    sid, first = part.samples.column("sample_id")[row].as_py(), part.samples.column("label_start")[row].as_py()
    features = zarr.open_array(str(bad / "parts" / part.name / "features"), mode="r+")
    features[first, 0] = float("nan")
    done = _train_cli(bad, zoo["idefics3"], tmp_path / "run", "--epochs", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "the loss is nan (not finite); stopped before the optimizer step" in done.stderr, done.stderr[-3000:]
    assert f"non-finite teacher values in {sid} (features)" in done.stderr and "--verify" in done.stderr
    step = int(done.stderr.split("step ")[1].split(":")[0])
    logged = _losses(tmp_path / "run", 1)
    assert len(logged) == step - 1 and all(x == x for x in logged), (step, logged)
    assert not (tmp_path / "run" / "stage1" / "final").exists()
    if step > 1:  # the checkpoint before it holds the weights of step - 1, all finite
        recal = load_file(tmp_path / "run" / "stage1" / "checkpoint" / "recalibrator" / "recalibrator.safetensors")
        assert all(torch.isfinite(v).all() for v in recal.values())


def test_a_stage_with_no_usable_sample_is_an_error_naming_why(store, zoo, tmp_path):
    """A text-only student on a store whose samples all have images: exit 2 naming why, not 0 steps and exit 0."""
    done = _train_cli(store, zoo["textlm"], tmp_path / "run", "--max-steps", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "stage 1 has nothing to train on" in done.stderr, done.stderr[-3000:]
    assert "the model is text-only" in done.stderr and "a vision-language student" in done.stderr
    assert not (tmp_path / "run" / "stage1" / "final").exists()
    assert not (tmp_path / "run" / "stage1" / "checkpoint").exists()
