"""Intermediate hidden states from inside a vLLM engine: a worker extension whose forward hooks keep chosen
decoder layers' outputs (the residual stream, transformers' `hidden_states[k]`) for the tokens of each step.

vLLM runs a batch as one flat stream of tokens; requests come in submission order (FCFS, whole prompts or
consecutive chunks of them), so the stream splits back into prompts by their lengths. `split` checks that the
positions restart at 0 where each prompt starts and raises otherwise (the caller then goes one prompt at a
time). Under tensor parallelism every rank holds the full residual stream: only TP rank 0 keeps it; under
pipeline parallelism each stage keeps the layers it owns.
"""

from __future__ import annotations

from typing import Any

import torch


def _decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The language model's decoder layers (not a vision tower's)."""
    for name, module in model.named_modules():
        if (name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and len(module) == num_layers
                and "vision" not in name and "visual" not in name):
            return module
    raise RuntimeError(f"no ModuleList of {num_layers} decoder layers in {type(model).__name__}")


def _positions(args: tuple, kwargs: dict) -> torch.Tensor:
    pos = kwargs.get("positions", args[0] if args else None)
    return pos[0] if pos.dim() == 2 else pos  # M-RoPE (3, N): the temporal row restarts at 0 per prompt too


class LayerCapture:
    """Mixed into vLLM's worker (`worker_extension_cls`); driven by `collective_rpc`."""

    def genrecal_capture(self, layers: list[int], num_layers: int) -> None:
        """Start keeping the outputs of `layers` (0: the input of the first decoder layer)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        self._genrecal_steps: list[dict[str, Any]] = []
        self._genrecal_hooks = []
        if get_tensor_model_parallel_rank() != 0:
            return
        decoder = _decoder_layers(self.model_runner.get_model(), num_layers)
        owned = [k for k in layers if type(decoder[max(k - 1, 0)]).__name__ != "PPMissingLayer"]
        steps = self._genrecal_steps

        def keep(k: int, positions: torch.Tensor, value: torch.Tensor) -> None:
            if k == owned[0]:  # the first of this worker's layers to run: a new forward step
                steps.append({"positions": _pack(positions.long()), "layers": {}})
            steps[-1]["layers"][k] = _pack(value.float())  # (N, D)

        for k in owned:
            if k == 0:
                def pre(module, args, kwargs, k=k):
                    keep(k, _positions(args, kwargs), kwargs.get("hidden_states", args[1] if len(args) > 1 else None))
                self._genrecal_hooks.append(decoder[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, kwargs, out, k=k):
                    hidden, residual = out if isinstance(out, tuple) else (out, None)
                    keep(k, _positions(args, kwargs), hidden if residual is None else hidden + residual)
                self._genrecal_hooks.append(decoder[k - 1].register_forward_hook(post, with_kwargs=True))

    def genrecal_take(self) -> list[dict[str, Any]]:
        """What the hooks kept since the last call, per forward step."""
        steps, self._genrecal_steps[:] = list(self._genrecal_steps), []
        return steps


def _pack(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """RPC results come back as plain msgpack: tensors travel as (dtype, shape, bytes)."""
    t = t.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.numpy().tobytes()


def _unpack(packed: Any) -> torch.Tensor:
    dtype, shape, data = packed
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def split(worker_steps: list[list[dict[str, Any]]], lengths: list[int], layers: list[int]
          ) -> list[dict[int, torch.Tensor]]:
    """Per prompt {layer: (L_i, D)} from every worker's captured steps (workers of other pipeline stages add
    their layers)."""
    merged: dict[int, torch.Tensor] = {}
    positions = None
    for steps in worker_steps:
        if not steps:
            continue
        for k in steps[0]["layers"]:
            merged[k] = torch.cat([_unpack(s["layers"][k]) for s in steps])  # (sum L_i, D)
        positions = torch.cat([_unpack(s["positions"]) for s in steps])
    if sorted(merged) != sorted(layers) or positions is None or len(positions) != sum(lengths):
        raise RuntimeError(f"captured {None if positions is None else len(positions)} tokens of layers "
                           f"{sorted(merged)}, expected {sum(lengths)} of {sorted(layers)}")
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    if bool((positions[starts] != 0).any()):
        raise RuntimeError("the engine did not run the prompts in submission order")
    return [{k: v[s : s + n] for k, v in merged.items()} for s, n in zip(starts.tolist(), lengths)]
