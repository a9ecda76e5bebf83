"""The README's pictures from a demo run (`make demo` or tools/digits_demo.py OUT): the loss curves of the
GenRecal run, and the feature-space picture at the start and the end of stage 1.
Run: python tools/make_figures.py demo-out docs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from genrecal_cache.store.reader import TeacherStore
from genrecal_train.plot import feature_picture, loss_curves
from genrecal_train.recalibrator import Recalibrator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", type=Path, help="the demo's output directory")
    ap.add_argument("out", type=Path, help="where the PNGs go")
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()
    run = args.demo / "runs" / "demo-GenRecal-on-the-teacher-s-answers"
    args.out.mkdir(parents=True, exist_ok=True)
    print(loss_curves(run, args.out / "loss-curves.png"))
    recals = {"start of stage 1": Recalibrator.load(run / "stage1" / "init" / "recalibrator"),
              "end of stage 1": Recalibrator.load(run / "stage1" / "final" / "recalibrator")}
    print(feature_picture(TeacherStore(args.demo / "stores" / "teacher"), str(run / "stage1" / "final" / "student"),
                          recals, args.out / "feature-space.png", args.samples))


if __name__ == "__main__":
    main()
