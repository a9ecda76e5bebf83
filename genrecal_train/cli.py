"""Command-line entry points `train-student` and `eval-student`; options map 1:1 onto their configs."""

from __future__ import annotations

import json

from genrecal_cache.core.config import run_app

from .config import TrainConfig
from .evaluate import EvalConfig, evaluate
from .trainer import train


def _train(cfg: TrainConfig) -> None:
    for final in train(cfg):
        print(f"train-student: {final}")


def _eval(cfg: EvalConfig) -> None:
    print(json.dumps(evaluate(cfg), indent=2))


def train_student_app() -> None:
    run_app(TrainConfig, _train, "train-student")


def eval_student_app() -> None:
    run_app(EvalConfig, _eval, "eval-student")


if __name__ == "__main__":
    train_student_app()
