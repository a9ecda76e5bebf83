"""Manifest fuzzing: whatever a manifest row holds, reading and rendering it either works or rejects it with a
reason (never another exception), and a cache-teacher run commits or rejects every row exactly once."""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genrecal_cache.core.errors import DatasetError, RejectError
from genrecal_cache.data.render import Renderer
from genrecal_cache.data.rows import parse_row
from genrecal_cache.data.sources import read_manifest
from genrecal_cache.job.config import CacheConfig
from genrecal_cache.job.launch import run_cache
from genrecal_cache.store.reader import TeacherStore
from genrecal_cache.teacher.hf import HFTeacher

pytestmark = pytest.mark.reliability


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + seed % 40, 8 + seed % 17), (seed % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200),
    st.sampled_from(["", " ", "<image>", "<image><image>", "\u202e\u0000", "<|im_end|>", "</s>", "{% raw %}",
                     "\ud7ff", "{{ raise_exception('x') }}"]),
    st.integers(1, 30000).map(lambda n: "a" * n),  # huge strings
    st.integers(1, 200).map(lambda n: "🙂" * n),
)
image_source = st.one_of(
    st.integers(0, 999).map(lambda s: base64.b64encode(_png(s)).decode()),
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.sampled_from(["images/0000.png", "images/missing.png", "../escape.png", "/etc/passwd", "", "data:,",
                     "data:image/png;base64,AAAA"]),
    st.binary(max_size=32).map(lambda b: {"bytes": base64.b64encode(b).decode()}),
    st.none(), st.integers(), st.floats(allow_nan=True),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), odd_text)
json_any = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(odd_text, c, max_size=4),
                        max_leaves=12)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, odd_text),
    st.just({"type": "image"}),
    st.builds(lambda s: {"type": "image", "image": s}, image_source),
    json_any,
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "ASSISTANT"]), json_scalar)
message = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, role, st.one_of(odd_text, st.lists(part, max_size=4))),
    json_any,
)
good_image = st.one_of(st.integers(0, 999).map(lambda s: base64.b64encode(_png(s)).decode()),
                      st.just("images/0000.png"))
nearly_valid = st.builds(  # well-formed conversations with odd text and images: reach rendering and the model
    lambda sys_, q, a, imgs, more: {
        "id": None, "images": imgs,
        "messages": ([{"role": "system", "content": sys_}] if sys_ else [])
        + [{"role": "user", "content": [{"type": "image"}] * len(imgs) + [{"type": "text", "text": q}]},
           {"role": "assistant", "content": a}] + more},
    st.one_of(st.none(), odd_text), odd_text, odd_text, st.lists(good_image, max_size=2),
    st.lists(st.builds(lambda r, t: {"role": r, "content": t}, st.sampled_from(["user", "assistant"]), odd_text),
             max_size=3),
)
row = st.one_of(
    nearly_valid, nearly_valid,
    st.builds(lambda i, m, im: {"id": i, "messages": m, "images": im}, json_scalar,
              st.lists(message, max_size=5), st.lists(image_source, max_size=3)),
    st.builds(lambda i, c, im: {"id": i, "conversations": c, "image": im}, json_scalar,
              st.lists(st.builds(lambda f, v: {"from": f, "value": v}, role, odd_text), max_size=5), image_source),
    json_any,
)
line = st.one_of(row.map(lambda r: json.dumps(r).encode()), st.binary(max_size=200),
                 odd_text.map(lambda t: t.encode("utf-8", "surrogatepass")))


@pytest.fixture(scope="module")
def teacher(zoo):
    return HFTeacher(str(zoo["llava"]), "float32", "cpu")


@pytest.fixture(scope="module")
def root(demo_manifest) -> Path:
    return demo_manifest.parent  # has images/0000.png


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line, min_size=1, max_size=3))
def test_reading_and_rendering_never_raise_anything_but_a_reject(teacher, root, lines):
    renderer = Renderer(teacher.processor, max_length=512)
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", dir=root, delete=False) as f:
        f.write(b"\n".join(x.replace(b"\n", b" ") for x in lines) + b"\n")
    try:
        rows = list(read_manifest(f.name))
        assert len(rows) == len(lines)
        for r in rows:
            try:
                renderer.render(parse_row(r, root))
            except RejectError as e:
                assert e.reason
    finally:
        Path(f.name).unlink()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line, min_size=1, max_size=6))
def test_every_fuzzed_row_is_committed_or_rejected_exactly_once(teacher, root, lines, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    manifest = root / f"fuzz-{work.name}.jsonl"
    manifest.write_bytes(b"\n".join(x.replace(b"\n", b" ") for x in lines) + b"\n")
    try:
        try:
            run_cache(CacheConfig(teacher="zoo", manifest=manifest, output=work / "s", dtype="float32",
                                  device="cpu", max_length=512, commit_every=2, progress=False, command=["fuzz"]),
                      teacher)
        except DatasetError as e:  # every row rejected: the job says so (and has recorded them all)
            assert "no sample committed" in str(e)
        store = TeacherStore(work / "s")
        committed = [r for p in store.parts for r in p.samples.column("source_row").to_pylist()]
        rejected = store.rejects().to_pylist()
        assert all(r["reason"] for r in rejected)
        assert sorted(committed + [r["source_row"] for r in rejected]) == list(range(len(lines)))
    finally:
        manifest.unlink()
