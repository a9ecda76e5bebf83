"""A small built-in visual question-answering manifest: digit images drawn with PIL, questions and word answers.

Mixes both dataset formats, single- and multi-turn conversations, images as files and inline base64, and a few
deliberately bad rows so that the rejects table has something to show. Tests import it; run it to write one.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS = "zero one two three four five six seven eight nine".split()
QUESTIONS = ["What digit is this?", "Which number is shown in the image?", "Read the digit.",
             "Tell me the number in this picture."]


def digit_image(digit: int, rng: random.Random, size: int = 64) -> Image.Image:
    """A noisy grey image with the digit drawn at a random offset and scale."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=rng.randint(size // 2, size * 3 // 4))
    x, y = rng.randint(4, size // 3), rng.randint(0, size // 6)
    draw.text((x, y), str(digit), fill=tuple(rng.randint(180, 255) for _ in range(3)), font=font)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_demo_manifest(out: Path | str, n: int = 24, seed: int = 0, bad_rows: bool = True) -> Path:
    """Write `n` good rows (and, with `bad_rows`, four bad ones) to `out/manifest.jsonl`; returns its path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        d = rng.randrange(10)
        img = digit_image(d, rng)
        name = f"images/{i:04d}.png"
        (out / name).write_bytes(_png(img))
        q = rng.choice(QUESTIONS)
        kind = i % 4
        if kind == 0:  # messages format, image by relative path
            rec = {"id": f"demo-{i}", "images": [name], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": WORDS[d]}]}
        elif kind == 1:  # LLaVA format
            rec = {"id": f"demo-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": WORDS[d]}]}
        elif kind == 2:  # multi-turn, inline base64 image, system prompt
            rec = {"id": f"demo-{i}", "images": [base64.b64encode(_png(img)).decode()], "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": WORDS[d]},
                {"role": "user", "content": "Is it more than five?"},
                {"role": "assistant", "content": "yes" if d > 5 else "no"}]}
        else:  # two images in one turn
            d2 = rng.randrange(10)
            name2 = f"images/{i:04d}b.png"
            (out / name2).write_bytes(_png(digit_image(d2, rng)))
            rec = {"id": f"demo-{i}", "images": [name, name2], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Read both digits."}]},
                {"role": "assistant", "content": f"{WORDS[d]} {WORDS[d2]}"}]}
        lines.append(json.dumps(rec))
    if bad_rows:
        lines.insert(3, '{"id": "bad-json", "messages": [')
        lines.insert(7, json.dumps({"id": "bad-image", "images": ["images/missing.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "one"}]}))
        lines.insert(11, json.dumps({"id": "no-answer", "messages": [{"role": "user", "content": "Hello?"}]}))
        lines.insert(15, json.dumps({"id": "bad-role", "messages": [
            {"role": "robot", "content": "beep"}, {"role": "assistant", "content": "one"}]}))
    path = out / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, epilog="e.g. python tools/demo_data.py out/data -n 16 "
                                     "(writes out/data/manifest.jsonl and out/data/images/, prints the manifest's "
                                     "path)")
    parser.add_argument("out", type=Path, help="folder to write manifest.jsonl and images/ into")
    parser.add_argument("-n", type=int, default=24, help="good rows to write (default: 24), with four bad rows "
                        "in among them (lines 4, 8, 12 and 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the digits, questions and images (default: 0)")
    args = parser.parse_args()
    print(write_demo_manifest(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
