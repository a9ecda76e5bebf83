"""The Recalibrator and its sequence: slot layout, causality, padding, initialisation, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch

from genrecal_cache.core.models import load_processor
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_train.losses import teacher_head_loss
from genrecal_train.recalibrator import Recalibrator, RecalibratorConfig
from genrecal_train.sequence import (
    SlotSample,
    answer_spans,
    build_batch,
    student_question_inputs,
    teacher_answer_inputs,
    teacher_question_inputs,
)


@pytest.fixture(scope="module")
def pair(zoo, demo_manifest, tmp_path_factory):
    """A Qwen2-VL teacher store and the Idefics3 student's features of the same conversations."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("recal") / "store"
    run_cache(CacheConfig(teacher=str(zoo["qwen2vl"]), manifest=demo_manifest, output=out, dtype="bfloat16",
                          device="cpu", question_features=True, progress=False, command=["test"]))
    store = TeacherStore(out)
    proc = load_processor(zoo["idefics3"])
    student = AutoModelForImageTextToText.from_pretrained(zoo["idefics3"]).eval()
    renderer = Renderer(proc)
    items = []
    for i in range(len(store)):
        t = store[i]
        s = renderer.render(parse_row(Row(i, {"messages": t.messages, "images": t.images}), out))
        with torch.no_grad():
            feats = student.base_model(**s.inputs).last_hidden_state[0]  # (L_s, D_s)
        items.append((t, feats, [seg.to_dict() for seg in s.segments]))
    return store, student.config, items


def _recal(store, student_config, **kw) -> Recalibrator:
    torch.manual_seed(0)
    return Recalibrator(RecalibratorConfig.from_student(student_config, store.meta["teacher"]["hidden_size"], **kw))


def _slots(item, mode, embed, student_feats=None):
    t, feats, segs = item
    feats = feats if student_feats is None else student_feats
    return SlotSample(student_question_inputs(feats, segs), teacher_answer_inputs(t, mode, embed))


def test_scored_slots_line_up_with_every_label_position(pair):
    store, _, items = pair
    multi = [it for it in items if len(answer_spans(it[0].segments)) > 1]
    assert multi, "the demo has multi-turn samples"
    for t, feats, segs in items:
        s = _slots((t, feats, segs), "features", None)
        batch = build_batch([s], feats.shape[1], "cpu", torch.float32)
        assert len(batch.scored_index) == len(t.targets)
        pos = 0
        for q, a in zip(s.question, s.answers):
            scored = batch.scored_index.tolist()
            assert pos + len(q) - 1 in scored and all(pos + len(q) + j in scored for j in range(len(a)))
            pos += len(q) + len(a)


def test_first_answer_token_is_scored_from_the_student_not_the_teacher(pair):
    """Features mode: zeroing the teacher feature of the first label position (what head(z_lab[0]) scores)
    changes nothing; the student's last question slot decides the first prediction of each answer."""
    store, cfg, items = pair
    recal = _recal(store, cfg).eval()
    t, feats, segs = items[2]  # multi-turn
    base = recal(build_batch([_slots(items[2], "features", None)], feats.shape[1], "cpu", torch.float32))
    zeroed = type(t)(**{**t.__dict__, "features": t.features.clone()})
    first_rows = []
    a = 0
    for _, start, end in answer_spans(t.segments):
        first_rows.append(a)
        a += end - start
    zeroed.features[first_rows] = 0
    out = recal(build_batch([_slots((zeroed, feats, segs), "features", None)], feats.shape[1], "cpu",
                            torch.float32))
    assert torch.equal(out, base), "a first-token teacher feature leaked into the sequence"
    moved = feats.clone()
    q0, a0, _ = answer_spans(segs)[0]
    moved[a0 - 1] += 1.0  # the student's last question slot before the first answer
    out = recal(build_batch([_slots(items[2], "features", None, moved)], feats.shape[1], "cpu", torch.float32))
    assert not torch.allclose(out[0], base[0]), "the first answer token does not depend on the student"


def test_embeddings_mode_feeds_no_teacher_feature(pair):
    store, cfg, items = pair
    embed = store.head("embed")
    recal = _recal(store, cfg, answer_inputs="embeddings").eval()
    t, feats, segs = items[2]
    s = _slots(items[2], "embeddings", embed)
    a = 0
    for inputs, (_, start, end) in zip(s.answers, answer_spans(t.segments)):
        assert torch.equal(inputs, embed[t.targets[a : a + end - start - 1]])
        a += end - start
    base = recal(build_batch([s], feats.shape[1], "cpu", torch.float32))
    noisy = type(t)(**{**t.__dict__, "features": torch.randn_like(t.features.float()).to(t.features.dtype)})
    out = recal(build_batch([_slots((noisy, feats, segs), "embeddings", embed)], feats.shape[1], "cpu",
                            torch.float32))
    assert torch.equal(out, base)


def test_outputs_are_causal_and_padding_free(pair):
    store, cfg, items = pair
    recal = _recal(store, cfg).eval()
    samples = [_slots(it, "features", None) for it in items[:3]]
    d = items[0][1].shape[1]
    together = recal(build_batch(samples, d, "cpu", torch.float32))
    alone = torch.cat([recal(build_batch([s], d, "cpu", torch.float32)) for s in samples])
    assert torch.allclose(together, alone, atol=1e-5), "padding changed the outputs"
    # Perturb the last answer slot of sample 0: only its own (last) scored output may change.
    s = samples[0]
    later = SlotSample(s.question, [a.clone() for a in s.answers])
    later.answers[-1][-1:] = later.answers[-1][-1:] + 1
    base = recal(build_batch([s], d, "cpu", torch.float32))
    out = recal(build_batch([later], d, "cpu", torch.float32))
    assert torch.equal(out[:-1], base[:-1]) and not torch.equal(out[-1], base[-1])


def test_regularizer_path_uses_the_teachers_own_question_features(pair):
    store, cfg, items = pair
    t, feats, segs = items[0]
    q = teacher_question_inputs(t)
    (q0, a0, _), = answer_spans(t.segments)[:1]
    assert len(q[0]) == a0 - q0
    assert torch.equal(q[0][-1], t.features[0])  # the last question position is the first label position
    recal = _recal(store, cfg).eval()
    s = SlotSample(q, teacher_answer_inputs(t, "features", None), teacher_question=True)
    out = recal(build_batch([s], feats.shape[1], "cpu", torch.float32))
    assert out.shape == (len(t.targets), t.features.shape[1]) and torch.isfinite(out).all()


def test_initialisation_is_as_documented(pair):
    store, cfg, _ = pair
    recal = _recal(store, cfg)
    std = recal.cfg.init_std
    assert (recal.proj_pre.bias == 0).all() and (recal.proj_post.bias == 0).all()
    assert (recal.out_norm.weight == 1).all() and (recal.out_norm.bias == 0).all()
    assert abs(recal.proj_pre.weight.std().item() - std) < 0.2 * std
    down = recal.blocks[0].down.weight.std().item()
    assert abs(down - std / math.sqrt(2 * recal.cfg.num_layers)) < 0.2 * down


def test_new_positions_matter_and_save_load_round_trips(pair, tmp_path):
    store, cfg, items = pair
    s = _slots(items[0], "features", None)
    d = items[0][1].shape[1]
    on = _recal(store, cfg).eval()
    off = _recal(store, cfg, new_positions=False).eval()
    b = build_batch([s], d, "cpu", torch.float32)
    assert not torch.allclose(on(b), off(b))
    on.save(tmp_path)
    again = Recalibrator.load(tmp_path).eval()
    assert torch.equal(again(b), on(b)) and again.cfg == on.cfg


def test_recalibrator_alone_learns_the_teacher(pair):
    """Stage-1 style: student frozen, only the Recalibrator trains; its loss falls clearly."""
    store, cfg, items = pair
    head = store.teacher_head()
    recal = _recal(store, cfg)
    opt = torch.optim.AdamW(recal.parameters(), lr=3e-3)
    samples = [_slots(it, "features", None) for it in items]
    z = torch.cat([it[0].features for it in items])
    t = torch.cat([it[0].targets for it in items])
    d = items[0][1].shape[1]
    batch = build_batch(samples, d, "cpu", torch.float32)
    parts = []
    for _ in range(40):
        out = teacher_head_loss(recal(batch, impl="chunked"), z, t, head, normalizer=len(t), impl="chunked")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        parts.append((out.ce.item(), out.kl.item()))
    # The teacher is an untrained tiny model, near-uniform over its vocabulary (KL to it starts ~0.02), so
    # what can be learnt is its targets: CE must fall clearly while KL stays small.
    assert parts[-1][0] < 0.85 * parts[0][0] and parts[-1][1] < 0.1, parts[::8]
