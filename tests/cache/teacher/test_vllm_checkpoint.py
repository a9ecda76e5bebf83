"""Checkpoints whose weight names vLLM reads otherwise get a renamed copy, written once, the rest linked."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from genrecal_cache.teacher.vllm_checkpoint import for_vllm


def test_transformers5_llava_tower_is_renamed_once(zoo, tmp_path):
    src = tmp_path / "llava"
    shutil.copytree(zoo["llava"], src)
    config = AutoConfig.from_pretrained(src)
    assert for_vllm(src, config, tmp_path / "store") == src  # llava-hf's layout: loaded as it is
    for f in src.glob("*.safetensors"):
        save_file({k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in load_file(f).items()},
                  f, metadata={"format": "pt"})
    out = for_vllm(src, config, tmp_path / "store")
    assert out.parent == tmp_path and out.name.startswith("store.vllm-checkpoint-")
    (weights,) = out.glob("*.safetensors")
    with safe_open(weights, "pt") as sf:
        keys = set(sf.keys())
    towers = {k for k in keys if "vision_tower" in k}
    assert towers and all(".vision_tower.vision_model." in k or k.startswith("vision_tower.vision_model.")
                          for k in towers)
    assert len(keys) == len(load_file(next(src.glob("*.safetensors"))))
    assert (out / "config.json").is_symlink() and (out / "tokenizer.json").is_symlink()
    mtime = weights.stat().st_mtime_ns
    assert for_vllm(src, config, tmp_path / "store") == out and weights.stat().st_mtime_ns == mtime  # once


def test_other_models_are_loaded_as_they_are(zoo, tmp_path):
    for name in ("qwen2vl", "idefics3", "textlm"):
        assert for_vllm(zoo[name], AutoConfig.from_pretrained(zoo[name]), tmp_path / "s") == zoo[name]


def test_gemma3_tower_is_renamed_and_a_checkpoint_rewritten_in_place_gets_a_new_copy(family_zoo, tmp_path):
    src = tmp_path / "gemma3"
    shutil.copytree(family_zoo["gemma3"], src)
    config = AutoConfig.from_pretrained(src)
    out = for_vllm(src, config, tmp_path / "store")
    with safe_open(next(out.glob("*.safetensors")), "pt") as sf:
        towers = [k for k in sf.keys() if "vision_tower" in k]
    assert towers and all(k.startswith("vision_tower.vision_model.") for k in towers), towers[:3]
    (weights,) = src.glob("*.safetensors")  # retrained in place: the copy must not keep the old weights
    tensors = load_file(weights)
    tensors = {k: v + 1 if k.endswith("embed_tokens.weight") else v for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    again = for_vllm(src, config, tmp_path / "store")
    assert again != out
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    with safe_open(next(again.glob("*.safetensors")), "pt") as sf:
        assert sf.get_tensor(key).equal(tensors[key])


def _renamed_llava(zoo, tmp_path) -> Path:
    """A LLaVA checkpoint saved with transformers 5's tower names (vLLM needs a renamed copy)."""
    src = tmp_path / "llava"
    shutil.copytree(zoo["llava"], src)
    for f in src.glob("*.safetensors"):
        save_file({k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in load_file(f).items()},
                  f, metadata={"format": "pt"})
    return src


def test_copies_started_at_once_share_one_renamed_checkpoint(zoo, tmp_path):
    """Several processes (data-parallel copies, Ray tasks) writing the copy at once: each builds its own, the first
    rename wins, none fails or deletes another's; a folder a killed process left is removed."""
    src = _renamed_llava(zoo, tmp_path)
    code = ("import sys; from pathlib import Path; from transformers import AutoConfig; "
            "from genrecal_cache.teacher.vllm_checkpoint import for_vllm; "
            "print(for_vllm(Path(sys.argv[1]), AutoConfig.from_pretrained(sys.argv[1]), Path(sys.argv[2])))")
    out = for_vllm(src, AutoConfig.from_pretrained(src), tmp_path / "store")  # where the copies will put it
    shutil.rmtree(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{dead.pid}")
    stale.mkdir()  # what a killed copy leaves
    procs = [subprocess.Popen([sys.executable, "-c", code, src, tmp_path / "store"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert {o.strip() for _, o, _ in results} == {str(out)}
    assert (out / "config.json").exists() and not stale.exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(["llava", "store.vllm-checkpoint-" + out.name
                                                                 .rsplit("-", 1)[1]])
