"""What it costs the vLLM backend to return every prompt token's final hidden state (pooling ALL) when the store
keeps only some of them: the same engine and prompts with ALL and with LAST pooling (one state per prompt),
bytes returned and milliseconds per sample, in one run.

A scaled one-layer teacher (hidden size `--d`, e.g. 3584 as Qwen2-7B) keeps the engine's compute small, so the
difference is mostly moving states out of the engine. Writes CSV. Example (needs vLLM):
    python tools/bench_vllm_states.py --d 3584 --tokens 512 --samples 16
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(out: Path, d: int) -> Path:
    """A one-layer Qwen2 text model of width `d` (the zoo's text tokenizer), weights random."""
    import torch
    from tiny_zoo import build_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = build_model("textlm", out / "base", seed=0)
    cfg = AutoConfig.from_pretrained(base)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = d, 256, 1
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = d // 128, 1, 128
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = out / f"one-layer-d{d}"
    model.save_pretrained(path)
    for f in base.iterdir():  # the tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def run(path: Path, pooling: str, prompts: list[list[int]], repeats: int) -> dict:
    from vllm import LLM
    from vllm.config import PoolerConfig

    llm = LLM(model=str(path), runner="pooling", convert="embed", dtype="float32", enforce_eager=True,
              pooler_config=PoolerConfig(task="token_embed" if pooling == "ALL" else "embed",
                                         pooling_type=pooling, use_activation=False),
              enable_prefix_caching=False, max_model_len=2048, gpu_memory_utilization=0.2)
    task = "token_embed" if pooling == "ALL" else "embed"
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.encode(inputs, pooling_task=task, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.encode(inputs, pooling_task=task, use_tqdm=False)
        times.append(time.perf_counter() - t)
    data = outs[0].outputs.data
    nbytes = sum(o.outputs.data.numel() * o.outputs.data.element_size() for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"pooling": pooling, "ms_per_sample": round(1000 * min(times) / len(prompts), 2),  # the least disturbed repeat
            "bytes_per_sample": nbytes // len(prompts), "state_shape": list(data.shape), "dtype": str(data.dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=3584, help="hidden size of the one-layer teacher")
    ap.add_argument("--tokens", type=int, default=512, help="prompt length")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pooling", default=None, help=argparse.SUPPRESS)  # internal: one engine per process
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("bench-vllm-states.csv"))
    args = ap.parse_args()
    prompts = [[5 + (i * 7 + j) % 400 for j in range(args.tokens)] for i in range(args.samples)]
    if args.pooling:
        print(json.dumps(run(Path(args.model), args.pooling, prompts, args.repeats)))
        return
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args.d)
        for pooling in ("ALL", "LAST"):  # each engine in its own process, one after the other
            p = subprocess.run([sys.executable, __file__, "--pooling", pooling, "--model", str(path), "--d",
                                str(args.d), "--tokens", str(args.tokens), "--samples", str(args.samples),
                                "--repeats", str(args.repeats)], capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit("\n".join(l for l in p.stderr.splitlines() if "Error" in l or "error" in l)[-3000:] or p.stderr[-3000:])
            rows.append({"d": args.d, "tokens": args.tokens, **json.loads(p.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    extra = rows[0]["ms_per_sample"] - rows[1]["ms_per_sample"]
    print(f"returning all {args.tokens} states instead of one: +{rows[0]['bytes_per_sample'] / 2**20:.2f} MiB and "
          f"{extra:+.2f} ms per sample ({extra / rows[0]['ms_per_sample']:.1%} of the ALL engine's time)")
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
