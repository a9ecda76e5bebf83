"""Print a short table of a train-student output directory's metrics: per stage, the first and last losses.

Usage: python tools/summarize_metrics.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("loss", "ar", "kl", "reg", "student")


def main() -> None:
    out = Path(sys.argv[1])
    print(f"{'stage':>5} {'steps':>5}  " + "  ".join(f"{k + ' first→last':>22}" for k in KEYS))
    for log in sorted(out.glob("stage*/metrics.jsonl")):
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        if not steps:
            continue
        cells = []
        for k in KEYS:
            vals = [r[k] for r in steps if k in r]
            cells.append(f"{vals[0]:>10.4f} → {vals[-1]:<9.4f}" if vals else f"{'-':>22}")
        print(f"{log.parent.name[5:]:>5} {steps[-1]['step']:>5}  " + "  ".join(cells))
        rel = [r for r in recs if "reliance_own_acc" in r]
        if rel:
            r = rel[-1]
            print(f"      student reliance (first answer token, held out): own features "
                  f"{r['reliance_own_acc']:.2f}, shuffled {r['reliance_shuffled_acc']:.2f} "
                  f"over {r['reliance_samples']} samples")


if __name__ == "__main__":
    main()
