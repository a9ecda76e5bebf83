"""`load_teacher`: the teacher a `TeacherSpec` names, on its backend (transformers or vLLM), each imported only
when chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genrecal_cache.core.models import check_model_dir

from .base import Backend, Teacher


@dataclass(frozen=True)
class TeacherSpec:
    """What loads a teacher: its checkpoint, the backend and that backend's settings (from `cache-teacher`'s
    options, `CacheConfig.teacher_spec`)."""

    path: str
    backend: Backend = Backend.hf
    dtype: str = "float32"  # resolved: never "auto"
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    layers: tuple[int, ...] = ()  # decoder layers whose outputs are stored besides the final features
    # vLLM only
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # default 0.9 on GPU, 0.25 on CPU
    engines: int = 1  # engines sharing the device (2 with --answers generate): each gets its share of memory
    enforce_eager: bool = False
    beside: Path | None = None  # where a checkpoint renamed for vLLM is written (next to the store)
    max_model_len: int | None = None  # default: max_length within the model's positions
    max_length: int | None = None


def load_teacher(spec: TeacherSpec) -> Teacher:
    """The backend's teacher."""
    check_model_dir(spec.path, "--teacher")
    if spec.backend == Backend.vllm:
        from .vllm import VLLMTeacher

        util = spec.gpu_memory_utilization or (0.9 if spec.device.startswith("cuda") else 0.25)
        return VLLMTeacher(spec.path, spec.dtype, spec.trust_remote_code, spec.layers, spec.processor_kwargs,
                           tensor_parallel_size=spec.tensor_parallel_size,
                           pipeline_parallel_size=spec.pipeline_parallel_size,
                           gpu_memory_utilization=util / spec.engines,
                           enforce_eager=spec.enforce_eager, beside=spec.beside,
                           max_model_len=spec.max_model_len or _engine_len(spec))
    from .hf import HFTeacher

    return HFTeacher(spec.path, spec.dtype, spec.device, spec.device_map, spec.trust_remote_code,
                     spec.processor_kwargs)


def _engine_len(spec: TeacherSpec) -> int | None:
    """--max-length, within what the model's positions allow (vLLM refuses a longer max_model_len)."""
    from transformers import AutoConfig

    trust_remote_code = spec.trust_remote_code  # only ever the flag (tests/reliability/test_untrusted.py)
    text = AutoConfig.from_pretrained(spec.path, trust_remote_code=trust_remote_code).get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    return min(x for x in (spec.max_length, limit) if x) if spec.max_length or limit else None
