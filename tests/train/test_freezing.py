"""What each stage trains: the vision encoder is frozen in stages 2-3 but never a projector (Qwen2-VL keeps its
merger inside `visual`), the counts per group are printed, and a frozen Recalibrator skips the regularizer."""

from __future__ import annotations

import pytest
import torch

from genrecal_train.forward import Counts
from genrecal_train.models import parameter_groups, vision_parameter_names
from genrecal_train.stages import freeze


@pytest.mark.parametrize("name,projector", [("qwen2vl", ".merger."), ("llava", "multi_modal_projector"),
                                            ("idefics3", ".connector.")])
def test_stage_2_trains_the_projector_and_not_the_vision_encoder(zoo, name, projector):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(zoo[name], dtype=torch.float32)
    vision = vision_parameter_names(model)
    assert vision and not any(projector in f".{n}" for n in vision), sorted(vision)[:5]
    freeze(model, None, 2, train_vision=False, freeze_recalibrator=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(projector in f".{n}" for n in trained) and not trained & vision
    groups = parameter_groups(model, None)
    assert groups["projector"][0] > 0 and groups["vision encoder"] == (0, sum(
        p.numel() for n, p in model.named_parameters() if n in vision))
    assert groups["language model"][0] > 0


def test_a_frozen_recalibrator_skips_the_regularizer(zoo, tmp_path):
    from .test_trainer import _cfg, _store, train

    store = _store(zoo, _demo(tmp_path), tmp_path / "store")
    train(_cfg(store, zoo, tmp_path / "run", stage="1", max_steps=1))
    from genrecal_train.trainer import Trainer

    with Trainer(_cfg(store, zoo, tmp_path / "run", stage="2", freeze_recalibrator=True), 2) as t:
        assert not t.use_regularizer
        parts = t.forward(t.next_micro_batches()[0], Counts(10, 10, 10))
    assert "reg" not in parts and "recal" in parts


def _demo(tmp_path):
    from demo_data import write_demo_manifest

    return write_demo_manifest(tmp_path / "demo", n=6, seed=2, bad_rows=False)
