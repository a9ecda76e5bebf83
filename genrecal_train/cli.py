"""Command-line entry point `train-student`; options map 1:1 onto `TrainConfig`."""

from __future__ import annotations

import os

import typer

from genrecal_cache.config import command_from

from .trainer import TrainConfig, train


def _train(cfg: TrainConfig) -> None:
    for final in train(cfg):
        print(f"train-student: {final}")


def train_student_app() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=TrainConfig.__doc__)
    app.command(name="train-student", help=TrainConfig.__doc__)(command_from(TrainConfig, _train))
    app(prog_name="train-student")


if __name__ == "__main__":
    train_student_app()
