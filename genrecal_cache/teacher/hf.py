"""The transformers teacher backend: a batched, teacher-forced forward that returns the final features
(the LM-head input, after the final norm) at the positions the store keeps. Runs on CPU or GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from genrecal_cache.core.models import head_scaling, load_model
from genrecal_cache.data.render import Generated, GenerationSettings, Rendered, Renderer
from genrecal_cache.store.head import TeacherHead

from .base import TeacherBase, TeacherOutput


class HFTeacher(TeacherBase):
    """A transformers teacher. `device_map="auto"` spreads a teacher larger than one GPU over all of them."""

    def __init__(self, path: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                 trust_remote_code: bool = False, processor_kwargs: dict | None = None):
        from transformers import AutoConfig

        self.path = path
        loaded = load_model(path, dtype=getattr(torch, dtype), device=device, device_map=device_map,
                            trust_remote_code=trust_remote_code, flag="--teacher", processor_kwargs=processor_kwargs)
        self.processor, self.model, self.multimodal = loaded.processor, loaded.model, loaded.multimodal
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.dtype = dtype
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self.head = TeacherHead(out.weight.detach(), out.bias.detach() if getattr(out, "bias", None) is not None
                                else None, *head_scaling(config))
        self.embed = inp.weight.detach()
        self.tied = out.weight.data_ptr() == inp.weight.data_ptr()
        self.config = config
        self.model_class = type(self.model).__name__

    @torch.no_grad()
    def forward(self, renderer: Renderer, batch: list[Rendered], question: bool,
                images: list[list[Any]] | None = None, layers: tuple[int, ...] = ()) -> list[TeacherOutput]:
        """Per sample its features at the label positions, at every other position when `question`, and after
        each of `layers` (`hidden_states[k]`). (`images` is for backends that take raw images; here they are
        in `batch`.)"""
        inputs = {k: v.to(self.device) for k, v in renderer.collate(batch).items()}
        out = self.model.base_model(**inputs, use_cache=False, output_hidden_states=bool(layers))
        hidden = out.last_hidden_state  # (B, L, D)
        outs = []
        for i, r in enumerate(batch):
            mask = torch.from_numpy(r.label_mask).to(hidden.device)  # (L_i,)
            h = hidden[i, : len(mask)]  # (L_i, D)
            outs.append(TeacherOutput(
                features=h[mask].float().cpu(),
                question=h[~mask].float().cpu() if question else None,
                layers={k: out.hidden_states[k][i, : len(mask)][mask].float().cpu() for k in layers},
            ))
        return outs

    @torch.no_grad()
    def generate(self, renderer: Renderer, prompts: list[Rendered], images: list[list[Any]],
                 gen: GenerationSettings, seeds: list[int]) -> list[Generated]:
        """The teacher's answer to each prompt (one at a time: this backend is the portable one, not the fast
        one), with the log-probability of every chosen token under the model's raw logits."""
        stop = renderer.stop_ids
        outs = []
        for r, seed in zip(prompts, seeds):
            torch.manual_seed(seed)  # per sample: a resumed job writes the same answers
            inputs = {k: v.to(self.device) for k, v in r.inputs.items()}
            g = self.model.generate(
                **inputs, max_new_tokens=gen.max_new_tokens, do_sample=gen.temperature > 0,
                temperature=gen.temperature if gen.temperature > 0 else None, top_p=gen.top_p if gen.temperature > 0
                else None, top_k=None, eos_token_id=stop, pad_token_id=renderer.pad_id, output_logits=True,
                return_dict_in_generate=True)
            new = g.sequences[0, len(r.input_ids):].cpu()  # (n,)
            logprobs = torch.stack(g.logits, 1)[0].float().log_softmax(-1).cpu()  # (n, V)
            chosen = logprobs.gather(-1, new[:, None])[:, 0]
            outs.append(Generated.cut(new.tolist(), chosen.tolist(), stop))
        return outs

