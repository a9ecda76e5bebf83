"""Visual question answering on scikit-learn's bundled digits (1797 8x8 images, no download): the demo's data.

Images are upscaled (and, with `--noise`/`--rotate`, made harder), questions come in several phrasings, answers
are words. A fixed split from `--seed`: `heldout.jsonl` (evaluation), `gold.jsonl` (the first `--gold` training
images with their answers), `pool.jsonl` (the remaining training images with the question only: the teacher
answers them with `cache-teacher --answers generate`) and `train.jsonl` (all training images with answers).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "zero one two three four five six seven eight nine".split()
QUESTIONS = ["What digit is this?", "Which number is shown in the image?", "Read the digit in this picture.",
             "Tell me the number in the image.", "What number is this?"]


def digit_image(pixels: np.ndarray, rng: random.Random, size: int, noise: float, rotate: float) -> Image.Image:
    """An 8x8 digit (values 0..16) as an RGB image of `size` pixels, with Gaussian noise and a random rotation."""
    grey = (pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    img = Image.fromarray(grey, "L").resize((size, size), Image.Resampling.BILINEAR)
    if rotate:
        img = img.rotate(rng.uniform(-rotate, rotate), resample=Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if noise:
        a = a + np.random.default_rng(rng.randrange(2**32)).normal(0, noise * 255, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")


def _row(i: int, image: str, question: str, answer: str | None) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": f"digit-{i}", "images": [image], "messages": messages}


def write_digits(out: Path | str, gold: int = 100, heldout: int = 397, seed: int = 0, size: int = 32,
                 noise: float = 0.0, rotate: float = 0.0) -> dict[str, Path]:
    """Write the four manifests (and the images under out/images); returns their paths by name."""
    from sklearn.datasets import load_digits

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = random.Random(seed)
    order = list(range(len(digits.target)))
    rng.shuffle(order)
    rows = []
    for i in order:
        name = f"images/{i}.png"
        buf = io.BytesIO()
        digit_image(digits.data[i], rng, size, noise, rotate).save(buf, format="PNG")
        (out / name).write_bytes(buf.getvalue())
        rows.append((i, name, rng.choice(QUESTIONS), WORDS[int(digits.target[i])]))
    held, train = rows[:heldout], rows[heldout:]
    if not 0 <= gold <= len(train):
        raise ValueError(f"--gold must be within 0..{len(train)}")
    files = {
        "heldout": [_row(*r) for r in held],
        "gold": [_row(*r) for r in train[:gold]],
        "pool": [_row(i, n, q, None) for i, n, q, _ in train[gold:]],
        "train": [_row(*r) for r in train],
    }
    paths = {}
    for name, recs in files.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gold", type=int, default=100, help="training images that keep their answers")
    ap.add_argument("--heldout", type=int, default=397, help="images held out for evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (from 8x8)")
    ap.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std, as a fraction of 255")
    ap.add_argument("--rotate", type=float, default=0.0, help="random rotation up to this many degrees")
    args = ap.parse_args()
    paths = write_digits(args.out, args.gold, args.heldout, args.seed, args.size, args.noise, args.rotate)
    for name, p in paths.items():
        print(f"{name}: {sum(1 for _ in p.open())} rows -> {p}")


if __name__ == "__main__":
    main()
