"""Make the demo's teacher: supervised fine-tuning of a tiny zoo VLM on a manifest's answers, then its held-out
accuracy. (The product trains students from a teacher store; this only stands in for the big pretrained
teacher that cannot be downloaded here.) Example:
    python tools/train_teacher.py --manifest digits/train.jsonl --heldout digits/heldout.jsonl --out teacher
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_zoo import build_model  # noqa: E402

from genrecal_cache.core.models import load_processor  # noqa: E402
from genrecal_cache.data.render import Renderer, compatible_runs
from genrecal_cache.data.rows import parse_row  # noqa: E402
from genrecal_cache.data.sources import read_manifest  # noqa: E402
from genrecal_train.evaluate import EvalConfig, evaluate  # noqa: E402
from genrecal_train.losses import student_loss  # noqa: E402


def train_sft(model_dir: Path, manifest: Path, epochs: int, lr: float, batch_size: int, seed: int,
              progress: bool = True) -> None:
    """SFT in place: CE at the label positions, AdamW with a linear decay to lr/10, then `save_pretrained`."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    renderer = Renderer(load_processor(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(model_dir).train()
    samples = [renderer.render(parse_row(row, manifest.parent)) for row in read_manifest(manifest)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * -(-len(samples) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.9 * s / max(steps, 1))
    rng = random.Random(seed)
    bar = tqdm(total=steps, desc=f"train {model_dir.name}", disable=not progress)
    for _ in range(epochs):
        rng.shuffle(samples)
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            n = sum(int(r.label_mask.sum()) for r in batch)
            opt.zero_grad(set_to_none=True)
            for run in compatible_runs(batch):
                part = [batch[j] for j in run]
                inputs = renderer.collate(part)
                mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)  # (B, L)
                for j, r in enumerate(part):
                    mask[j, : len(r.label_mask)] = torch.from_numpy(r.label_mask)
                hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, L, D)
                student_loss(model.lm_head, hidden, inputs["input_ids"], mask, n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    model.save_pretrained(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="training rows with answers")
    ap.add_argument("--heldout", type=Path, required=True, help="rows to report the accuracy on")
    ap.add_argument("--out", type=Path, required=True, help="where the teacher is written")
    ap.add_argument("--arch", default="llava", help="tiny zoo architecture")
    ap.add_argument("--scale", type=int, default=2, help="tiny zoo width/depth multiplier")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--untrained", action="store_true", help="save the random initialisation (a control)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build_model(args.arch, args.out, seed=args.seed, scale=args.scale)
    if not args.untrained:
        train_sft(args.out, args.manifest, args.epochs, args.lr, args.batch_size, args.seed)
    res = evaluate(EvalConfig(student=str(args.out), manifest=args.heldout, max_new_tokens=4, device="cpu",
                              progress=False, command=[]))
    print(json.dumps({"teacher": str(args.out), "heldout_accuracy": res["normalised_match"],
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
