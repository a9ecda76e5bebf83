"""Experiment tracking for `train-student --report-to`: one small interface (`params`, `log`, `close`) over
TensorBoard, Weights & Biases and MLflow; metrics.jsonl is always written besides (metrics.py).

Each stage is one run (named `<output>-stage<k>`, grouped by the output folder), with the run's config and the
store's identity as its parameters.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from genrecal_cache.core.errors import ConfigError

BACKENDS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow")}  # backend: (module, genrecal extra)


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(text: str) -> tuple[str, ...]:
    """`--report-to`: 'none', 'auto' (TensorBoard when installed) or a comma-separated list of BACKENDS."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names in ((), ("none",)):
        return ()
    if names == ("auto",):
        return ("tensorboard",) if _installed("tensorboard") else ()
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"--report-to {text}: unknown {', '.join(unknown)}; choose none, auto or a comma-separated "
                          f"list of {', '.join(BACKENDS)}")
    for name in names:
        if not _installed(name):
            module, extra = _PACKAGES[name]
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install -e '.[{extra}]' in the "
                              "GenRecal clone")
    return names


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(_PACKAGES[name][0]) is not None


def open_trackers(names: tuple[str, ...], folder: Path, run: str, group: str, params: dict[str, Any]
                  ) -> list[Tracker]:
    """One tracker per backend for the run `run` writing under `folder`, its parameters recorded."""
    makers = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
    return [makers[name](folder, run, group, _flat(params)) for name in names]


def stage_trackers(cfg: Any, store: Any, folder: Path, stage: int) -> list[Tracker]:
    """The trackers of stage `stage` of the run `cfg` (a TrainConfig) writing under `folder`, with the run's options
    and the store's identity (`store`: its TeacherStore) as parameters."""
    meta = store.meta
    params = {"config": {k: str(v) for k, v in asdict(cfg).items() if k != "command"},
              "store": {"path": str(cfg.store), "samples": len(store), "teacher": meta.get("teacher", {}),
                        "format_version": meta.get("format_version")}}
    return open_trackers(cfg.report_to_backends, folder, f"{cfg.output.name}-stage{stage}", cfg.output.name, params)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested parameters as one level of 'a.b' keys with plain values (what every backend takes)."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, bool, str)) else str(v)
    return out


class _TensorBoard:
    def __init__(self, folder: Path, run: str, group: str, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A W&B run under `folder/wandb` (WANDB_MODE=offline works without a network, `wandb sync` uploads later)."""

    def __init__(self, folder: Path, run: str, group: str, params: dict[str, Any]):
        import wandb

        self.run = wandb.init(project="genrecal", name=run, group=group, dir=str(folder), config=params,
                              reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run in experiment `group`, at MLFLOW_TRACKING_URI (default: the file store `mlruns/` beside the
    stages)."""

    def __init__(self, folder: Path, run: str, group: str, params: dict[str, Any]):
        import os

        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: MLflow asks to opt in to it (it favours a database or a server)
            uri = (folder.parent / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(uri)
        exp = self.client.get_experiment_by_name(group)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(group)
        self.run_id = self.client.create_run(exp_id, run_name=run).info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
