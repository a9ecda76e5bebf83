"""`--layers` (intermediate hidden states) and `--answers generate` (the teacher writes the answers), with the
transformers backend; tests/test_vllm.py checks the vLLM backend against the same references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genrecal_cache.core.errors import ConfigError, DatasetError, IncompatibleStoreError
from genrecal_cache.data.render import GenerationSettings
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.inspection import format_summary, summary
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.teacher.hf import HFTeacher


def _cfg(model: Path, manifest: Path, out: Path, **kw) -> CacheConfig:
    return CacheConfig(teacher=str(model), manifest=manifest, output=out, dtype="float32", device="cpu",
                       progress=False, command=["test"], **kw)


def _sample(manifest: Path, sample_id: str):
    for i, line in enumerate(manifest.read_text().splitlines()):
        if json.loads(line).get("id") == sample_id:
            return parse_row(Row(i, json.loads(line)), manifest.parent, need_answer=False)
    raise KeyError(sample_id)


def check_layers(store_path: Path, teacher: HFTeacher, manifest: Path, layers: tuple[int, ...]) -> None:
    """Each stored layer equals transformers' `hidden_states[k]` at the label positions (one sample at a time)."""
    store = TeacherStore(store_path)
    assert store.meta["layers"] == list(layers) and len(store) > 0
    renderer = teacher.renderer(None)
    for i in range(len(store)):
        t = store[i]
        r = renderer.render(_sample(manifest, t.sample_id))
        with torch.no_grad():
            hs = teacher.model.base_model(**r.inputs, output_hidden_states=True).hidden_states
        pos = torch.from_numpy(r.label_positions)
        for k in layers:
            assert (t.layers[k] - hs[k][0, pos].float()).abs().max() <= 1e-4, (t.sample_id, k)
        assert not torch.equal(t.layers[layers[0]], t.features)


def check_generated(store_path: Path, teacher: HFTeacher, manifest: Path, generated: dict) -> int:
    """The store holds what was generated, and teacher-forcing it gives the generation's own log-probabilities.
    Returns how many samples round-tripped (text -> the same token ids) and so could be compared token by token."""
    store = TeacherStore(store_path)
    head = store.teacher_head()
    tok = teacher.renderer(None).tokenizer
    assert store.meta["answers"] == "generate" and len(store) == len(generated)
    compared = 0
    for i in range(len(store)):
        t = store[i]
        g = generated[t.sample_id]
        assert t.answers_generated
        assert t.messages[-1]["content"][0]["text"] == tok.decode(g.token_ids, skip_special_tokens=False)
        assert t.answer_truncated == (not g.stopped)  # kept with --truncated keep, and marked
        last = t.segments[-1]
        start, end = last["answer_start"], last["end"]
        n = len(g.token_ids)
        if t.token_ids[start : start + n].tolist() != g.token_ids:
            continue  # its text tokenises to other ids: teacher-forced on those, not comparable token by token
        first = len(t.targets) - (end - start)  # the last answer's first label row
        logprobs = head.logits(t.features[first : first + n]).log_softmax(-1)  # (n, V)
        forced = logprobs.gather(-1, t.targets[first : first + n, None].long())[:, 0]
        assert torch.equal(t.targets[first : first + n].long(), torch.tensor(g.token_ids))
        assert torch.allclose(forced, torch.tensor(g.logprobs), atol=1e-4), (t.sample_id, forced, g.logprobs)
        compared += 1
    return compared


def generate_reference(teacher, manifest: Path, gen: GenerationSettings) -> dict:
    """What `teacher.generate` writes for every manifest row, asked directly (same seeds as the job)."""
    out = {}
    renderer = teacher.renderer(None)
    for i, line in enumerate(manifest.read_text().splitlines()):
        s = parse_row(Row(i, json.loads(line)), manifest.parent, need_answer=False)
        (g,) = teacher.generate(renderer, [renderer.render_prompt(s)], [[im.load() for im in s.images]], gen,
                                [gen.seed * 1_000_003 + i])
        out[s.sample_id] = g
    return out


@pytest.mark.parametrize("name", ["llava", "qwen2vl", "textlm"])
def test_layers_are_transformers_hidden_states(name, zoo, clean_manifest, text_manifest, tmp_path):
    manifest = text_manifest if name == "textlm" else clean_manifest
    run_cache(_cfg(zoo[name], manifest, tmp_path / "s", layers="0,1", max_samples=4))
    check_layers(tmp_path / "s", HFTeacher(str(zoo[name])), manifest, (0, 1))
    assert summary(TeacherStore(tmp_path / "s"))["layers"] == [0, 1]


def test_layers_out_of_range_names_the_flag(zoo, clean_manifest, tmp_path):
    with pytest.raises(ConfigError, match="--layers 0,2: the teacher has 2 decoder layers"):
        run_cache(_cfg(zoo["llava"], clean_manifest, tmp_path / "s", layers="0,2"))
    with pytest.raises(ConfigError, match="--layers must be comma-separated"):
        _cfg(zoo["llava"], clean_manifest, tmp_path / "s", layers="last")


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_generated_answers_reproduce_their_logprobs(name, zoo, clean_manifest, text_manifest, tmp_path):
    manifest = text_manifest if name == "textlm" else clean_manifest
    gen = GenerationSettings(max_new_tokens=6)
    res = run_cache(_cfg(zoo[name], manifest, tmp_path / "s", answers="generate", max_new_tokens=6,
                         truncated="keep"))
    teacher = HFTeacher(str(zoo[name]))
    generated = generate_reference(teacher, manifest, gen)
    assert res.samples == len(generated) and res.rejects == 0
    compared = check_generated(tmp_path / "s", teacher, manifest, generated)
    assert compared >= 1 and compared == res.samples - res.retokenized
    assert TeacherStore(tmp_path / "s").meta["generation"]["max_new_tokens"] == 6
    text = format_summary(summary(TeacherStore(tmp_path / "s")))
    assert "written by the teacher (greedy, at most 6 tokens)" in text


def test_generate_answers_a_final_user_turn_and_resumes_identically(zoo, text_manifest, tmp_path):
    """A conversation ending with a question gets the teacher's answer; a second run with other settings is
    refused, and sampling (temperature > 0) is reproducible per sample."""
    rows = [json.loads(x) for x in text_manifest.read_text().splitlines()]
    rows[0]["messages"] = rows[0]["messages"][:1]  # the question only
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kw = dict(answers="generate", max_new_tokens=5, gen_temperature=1.0, gen_seed=3, truncated="keep")
    run_cache(_cfg(zoo["textlm"], manifest, tmp_path / "a", **kw))
    run_cache(_cfg(zoo["textlm"], manifest, tmp_path / "b", **kw, commit_every=1, max_samples=1))
    run_cache(_cfg(zoo["textlm"], manifest, tmp_path / "b", **kw, commit_every=1))
    a, b = TeacherStore(tmp_path / "a"), TeacherStore(tmp_path / "b")
    assert len(a) == len(b) == len(rows)
    assert a[0].messages[-1]["role"] == "assistant" and len(a[0].messages) == 2
    for i in range(len(a)):
        assert a[i].messages == b[i].messages and torch.equal(a[i].token_ids, b[i].token_ids)
    with pytest.raises(IncompatibleStoreError, match="generation"):
        run_cache(_cfg(zoo["textlm"], manifest, tmp_path / "a", **{**kw, "gen_seed": 4}))


def test_an_answer_cut_off_at_max_new_tokens_is_a_reject_by_default(zoo, clean_manifest, tmp_path):
    """An answer the teacher did not finish within --max-new-tokens would teach the student to stop mid-answer:
    by default it is a reject saying so; a finished one is kept."""
    teacher = HFTeacher(str(zoo["llava"]))
    generated = generate_reference(teacher, clean_manifest, GenerationSettings(max_new_tokens=6))
    cut = {sid for sid, g in generated.items() if not g.stopped}
    assert cut, "the untrained teacher finished every answer within 6 tokens: the test cannot tell"
    try:
        run_cache(_cfg(zoo["llava"], clean_manifest, tmp_path / "s", answers="generate", max_new_tokens=6))
    except DatasetError as e:  # every answer was cut off
        assert "cut off at --max-new-tokens N" in str(e)  # reasons counted by kind
    store = TeacherStore(tmp_path / "s")
    reasons = {r["sample_id"]: r["reason"] for r in store.rejects().to_pylist()}
    assert {sid for sid, why in reasons.items() if "cut off at --max-new-tokens 6 without ending" in why} == cut
    assert not any(store[i].answer_truncated for i in range(len(store)))


def test_processor_kwargs_reach_the_processor_and_are_checked_on_resume(zoo, tmp_path):
    """Qwen2-VL's max_pixels: a 224 px image becomes (112/14)^2/4 = 16 image tokens with max_pixels 112*112 (the
    tiny zoo processor's own setting gives 4); the store records it and a resumed job with another is refused."""
    from PIL import Image

    Image.new("RGB", (224, 224), "gray").save(tmp_path / "big.png")
    row = {"id": "big", "images": ["big.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "gray"}]}
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(row) + "\n")
    pad = HFTeacher(str(zoo["qwen2vl"])).processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = {}
    for name, kw in (("default", ""), ("small", '{"max_pixels": 12544}')):
        run_cache(_cfg(zoo["qwen2vl"], m, tmp_path / name, processor_kwargs=kw))
        store = TeacherStore(tmp_path / name)
        counts[name] = int((store[0].token_ids == pad).sum())
        assert store.meta["processor_kwargs"] == json.loads(kw or "{}")
    assert counts == {"default": 4, "small": 16}, counts
    with pytest.raises(IncompatibleStoreError, match="processor_kwargs"):
        run_cache(_cfg(zoo["qwen2vl"], m, tmp_path / "small", processor_kwargs='{"max_pixels": 50176}'))
    with pytest.raises(ConfigError, match="--processor-kwargs must be a JSON object"):
        _cfg(zoo["qwen2vl"], m, tmp_path / "x", processor_kwargs="max_pixels=3")
