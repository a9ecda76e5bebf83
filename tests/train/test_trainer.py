"""train-student end to end on a tiny teacher/student pair with different tokenizers and image-token counts
(Qwen2-VL teacher, Idefics3 student): stages, freezing, regularizer, exact resume, reloadable outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
from tests.helpers import ROOT


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


def _cli(store, zoo, out, kill_at=None, workers: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GENRECAL_KILL_AT", None)
    if kill_at:
        env["GENRECAL_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "genrecal_train.cli", "--store", str(store), "--student", str(zoo["idefics3"]),
           "--output", str(out), "--stage", "1", "--batch-size", "3", "--epochs", "2", "--lr", "1e-3",
           "--save-every", "3", "--log-every", "1", "--reliance-every", "0", "--device", "cpu", "--no-progress",
           "--resume", "--num-workers", str(workers)]
    if not kill_at:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    # Killed: its output goes to a file, not a pipe (a leftover worker would keep a pipe open), and nothing of
    # its process group may outlive it for long: DataLoader workers end with their trainer.
    log = out.parent / f"{out.name}-killed.log"
    with log.open("w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=f, text=True, cwd=ROOT, start_new_session=True)
        p.wait(timeout=600)
    deadline = time.monotonic() + 20
    while _group_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_alive(p.pid)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    assert not left, "DataLoader workers outlived their killed trainer"
    return subprocess.CompletedProcess(cmd, p.returncode, "", log.read_text())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(store, zoo, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("ref")
    ref = _cli(store, zoo, out)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return _losses(out, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_gives_the_same_losses(store, zoo, uninterrupted, tmp_path, workers):
    """Killed at step 5 and resumed from the step-3 checkpoint: the losses of one uninterrupted run without
    workers, also when DataLoader workers read the store (the batches do not depend on their number)."""
    killed = _cli(store, zoo, tmp_path / "run", kill_at="train-step:1:5", workers=workers)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(_losses(tmp_path / "run", 1)) == 5
    again = _cli(store, zoo, tmp_path / "run", workers=workers)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = uninterrupted, _losses(tmp_path / "run", 1)
    assert _losses(tmp_path / "run", 1, "resumed_from") == [3], "did not resume from the step-3 checkpoint"
    assert len(a) == len(b) > 5 and a == b, (a, b)


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
    env = dict(os.environ, OMP_NUM_THREADS="1")
    png = tmp_path / "f.png"
    done = subprocess.run([sys.executable, "-m", "genrecal_cache", "inspect-cache", "--store", str(store), "--plot",
                           str(png), "--student", str(trained / "stage1" / "final" / "student"), "--recalibrator",
                           str(trained / "stage1" / "init" / "recalibrator"), "--recalibrator",
                           str(trained / "stage1" / "final" / "recalibrator"), "--plot-samples", "12"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loss_curves(trained, tmp_path / "c.png").stat().st_size > 1000
