"""Manifest reading (both formats, JSONL and Parquet, every image source) and conversation rendering."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrecal_cache.core.errors import RejectError
from genrecal_cache.core.models import load_processor
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import Row, parse_row
from genrecal_cache.data.sources import read_manifest


@pytest.fixture(scope="module")
def png(demo_manifest: Path) -> bytes:
    return (demo_manifest.parent / "images" / "0000.png").read_bytes()


def test_messages_and_llava_formats_normalise_to_the_same_sample(demo_manifest, png):
    root = demo_manifest.parent
    msgs = parse_row(Row(0, {"id": "a", "images": ["images/0000.png"], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]}), root)
    llava = parse_row(Row(1, {"id": "a", "image": "images/0000.png", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "seven"}]}), root)
    assert msgs.messages == llava.messages
    assert msgs.images[0].digest == llava.images[0].digest
    assert msgs.images[0].data == png


@pytest.mark.parametrize("source", ["relative", "absolute", "base64", "data-uri", "inline-part", "bytes"])
def test_every_image_source(demo_manifest, png, source):
    root = demo_manifest.parent
    src = {"relative": "images/0000.png", "absolute": str(root / "images" / "0000.png"),
           "base64": base64.b64encode(png).decode(), "bytes": png,
           "data-uri": "data:image/png;base64," + base64.b64encode(png).decode(), "inline-part": None}[source]
    image_part = {"type": "image", "path": "images/0000.png"} if source == "inline-part" else {"type": "image"}
    rec = {"messages": [{"role": "user", "content": [image_part, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "one"}]}
    if src is not None:
        rec["images"] = [src]
    s = parse_row(Row(0, rec), root)
    assert s.images[0].data == png and s.images[0].load().size == (64, 64)
    assert (s.images[0].path is not None) == (source in ("relative", "absolute", "inline-part"))


def test_parquet_manifest_with_nested_messages_and_binary_images(tmp_path, png):
    rows = [{"id": f"p{i}", "images": [png], "messages": json.dumps([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": "seven"}])} for i in range(3)]
    rows.append({"id": "p3", "images": [], "messages": json.dumps([{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "hello"}])})
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    samples = [parse_row(r, tmp_path) for r in read_manifest(path)]
    assert [s.sample_id for s in samples] == ["p0", "p1", "p2", "p3"]
    assert samples[0].images[0].data == png and samples[3].images == []


def test_bad_utf8_and_blank_lines_become_row_errors(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": 1}\n\xff\xfe\n\n')
    rows = list(read_manifest(p))
    assert rows[0].error is None and "not valid UTF-8" in rows[1].error and "empty" in rows[2].error


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2vl"])
def test_render_ids_equal_the_processor_and_spans_are_the_answers(name, zoo, demo_manifest):
    proc = load_processor(zoo[name])
    r = Renderer(proc)
    sample = parse_row(Row(0, {"images": ["images/0000.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "no more"}]}), demo_manifest.parent)
    out = r.render(sample)
    text = proc.apply_chat_template(sample.messages, tokenize=False)
    ids = proc(text=[text], images=[[sample.images[0].load()]], add_special_tokens=False)["input_ids"][0]
    assert out.input_ids.tolist() == list(ids)
    answers = [proc.tokenizer.decode(out.input_ids[a:b]) for a, b in out.answer_spans]
    assert "seven" in answers[0] and "no more" in answers[1] and "More" not in answers[1]
    assert out.segments[0].start == 0 and out.segments[-1].end == len(out.input_ids)
    assert all(a.end == b.start for a, b in zip(out.segments, out.segments[1:]))
    assert np.array_equal(out.targets, out.input_ids[out.label_positions + 1])


def test_inconsistent_template_prefixes_are_rejected(zoo, tmp_path):
    """A template that renders the last turn differently cannot be split into turns: reject, don't guess."""
    proc = load_processor(zoo["textlm"])
    proc.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if not loop.last %}<end_of_turn>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    sample = parse_row(Row(0, {"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "one"},
                                            {"role": "user", "content": "two"},
                                            {"role": "assistant", "content": "three"}]}), tmp_path)
    with pytest.raises(RejectError, match="does not render prefixes consistently"):
        Renderer(proc).render(sample)


def test_text_only_teacher_rejects_images(zoo, demo_manifest):
    sample = parse_row(Row(0, {"images": ["images/0000.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "one"}]}), demo_manifest.parent)
    with pytest.raises(RejectError, match="model is text-only"):
        Renderer(load_processor(zoo["textlm"])).render(sample)


def test_short_base64_image_is_not_mistaken_for_a_path(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    assert len(b64) < 200
    s = parse_row(Row(0, {"images": [b64], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "red"}]}), tmp_path)
    assert s.images[0].load().getpixel((0, 0)) == (200, 10, 10)


def test_wrapped_and_unpadded_base64(tmp_path, png):
    b64 = base64.b64encode(png).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n"
    for src in (wrapped, b64.rstrip("=")):
        s = parse_row(Row(0, {"images": [src], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "one"}]}), tmp_path)
        assert s.images[0].data == png


def test_image_paths_cannot_leave_the_dataset_root_unless_allowed(tmp_path, png):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png)
    for src in ("../secret.png", str(tmp_path / "secret.png")):
        rec = {"images": [src], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "one"}]}
        with pytest.raises(RejectError, match="outside the dataset root.*--allow-outside-root"):
            parse_row(Row(0, rec), root)
        assert parse_row(Row(0, rec), root, allow_outside_root=True).images[0].data == png
