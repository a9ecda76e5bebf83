"""`train-student --report-to`: TensorBoard, W&B (offline) and MLflow (a local store) each get the stage's losses,
learning rate, tokens/s and data-wait share, with the run's config and the store's identity as parameters; read
back from what each wrote. A tracker whose package is missing is an error naming the extra to install."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genrecal_cache.core.errors import ConfigError
from genrecal_train import tracking
from tests.helpers import run_command


@pytest.fixture(scope="module")
def store(zoo, clean_manifest, tmp_path_factory) -> Path:
    from .test_trainer import _store

    return _store(zoo, clean_manifest, tmp_path_factory.mktemp("tracking") / "store")


def test_every_tracker_gets_the_metrics_and_the_parameters(store, zoo, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    r = run_command("train-student", "--store", store, "--student", zoo["idefics3"], "--output", out, "--stage", "3",
                    "--max-steps", "4", "--log-every", "2", "--batch-size", "2", "--report-to",
                    "tensorboard,wandb,mlflow", "--no-progress", timeout=600,
                    env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                    drop_env=["MLFLOW_TRACKING_URI"])
    assert r.returncode == 0, r.stderr[-3000:]
    stage = out / "stage3"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("stage3/loss")] == [2, 4]
    assert {"stage3/lr", "stage3/tokens_per_s", "stage3/data_wait_share"} <= set(events.Tags()["scalars"])

    (run,) = (stage / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))  # the offline run's record, for `wandb sync`

    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient((out / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert found.info.run_name == "run-stage3"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "stage3/loss")] == [2, 4]
    assert found.data.params["config.batch_size"] == "2"
    assert found.data.params["store.samples"] and found.data.params["store.teacher.head_digest"]


def test_report_to_names_the_choices_and_the_extra_to_install(monkeypatch):
    assert tracking.parse_report_to("none") == ()
    with pytest.raises(ConfigError, match="unknown neptune; choose none, auto or"):
        tracking.parse_report_to("tensorboard,neptune")
    monkeypatch.setitem(tracking._PACKAGES, "wandb", ("genrecal_no_such_module", "wandb"))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[wandb\]'"):
        tracking.parse_report_to("wandb")
