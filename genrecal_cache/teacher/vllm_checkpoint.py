"""Checkpoints as vLLM loads them: where transformers 5 saved a known model with other weight names than vLLM's
model class reads (LLaVA's and Gemma 3's CLIP/SigLIP tower without `vision_model.`), a renamed copy written once
beside the store.

Only the safetensors files holding renamed weights are rewritten; every other file is linked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from genrecal_cache.core.durable import fsync_tree
from genrecal_cache.core.errors import ConfigError
from genrecal_cache.core.process import alive

# vLLM's LLaVA family and Gemma 3 build their CLIP / SigLIP towers as `vision_tower.vision_model.*`; transformers
# 5 saves them as `vision_tower.*` (and `model.vision_tower.*`).
_ARCHITECTURES = ("Llava", "Gemma3ForConditionalGeneration")  # name prefixes
_TOWERS = ("clip_vision_model", "siglip_vision_model")
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")


def renamed(key: str, config: Any) -> str:
    """The name vLLM reads weight `key` by (the same when it needs no renaming)."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    tower = getattr(getattr(config, "vision_config", None), "model_type", "")
    if arch.startswith(_ARCHITECTURES) and tower in _TOWERS:
        for prefix in _TOWER_PREFIXES:
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + key[len(prefix):]
    return key


def for_vllm(path: Path, config: Any, beside: Path) -> Path:
    """`path`, or its renamed copy `<beside>.vllm-checkpoint-<digest>` (written on first use, atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(path.glob("*.safetensors"))
    changes: dict[Path, dict[str, str]] = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            moved = {k: renamed(k, config) for k in sf.keys() if renamed(k, config) != k}
        if moved:
            changes[f] = moved
    if not changes:
        return path
    # The copied files' sizes and times are in the name: a checkpoint rewritten in place gets a fresh copy.
    stamps = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in changes}
    digest = hashlib.sha256(json.dumps([{str(f): m for f, m in sorted(changes.items())}, stamps], sort_keys=True)
                            .encode() + str(path.resolve()).encode()).hexdigest()[:12]
    out = beside.parent / f"{beside.name}.vllm-checkpoint-{digest}"
    if (out / "config.json").exists():
        return out
    # Each process builds its own copy (data-parallel copies and Ray tasks may start at once, on several hosts):
    # the first rename wins and the others drop theirs. A killed process's folder is removed by the next one here.
    _remove_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for f in path.iterdir():
            if f in changes:
                with safe_open(f, "pt") as sf:
                    tensors = {changes[f].get(k, k): sf.get_tensor(k) for k in sf.keys()}
                    meta = sf.metadata()
                save_file(tensors, tmp / f.name, metadata=meta or {"format": "pt"})
            elif f.name.endswith(".safetensors.index.json"):
                index = json.loads(f.read_text())
                index["weight_map"] = {renamed(k, config): v for k, v in index.get("weight_map", {}).items()}
                (tmp / f.name).write_text(json.dumps(index))
            else:
                os.symlink(f.resolve(), tmp / f.name)
        fsync_tree(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # not another copy's rename that came first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--teacher {path}: vLLM reads {sum(len(m) for m in changes.values())} of its weights by "
                          f"other names, and the renamed copy could not be written to {out} ({e}); free space "
                          "there, or use --backend hf") from None
    return out


def _remove_stale(out: Path) -> None:
    """Remove the unfinished copies of `out` that processes of this host left when killed."""
    host = socket.gethostname()
    for tmp in out.parent.glob(f"{out.name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
