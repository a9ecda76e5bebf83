"""Command-line entry points `cache-teacher` and `inspect-cache`.

Options map 1:1 onto the config dataclasses (`config.command_from`); a user error prints its fix and exits 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

from genrecal_cache.core.config import flag, run_app
from genrecal_cache.core.errors import ConfigError, StoreError
from genrecal_cache.core.locations import STORAGE_OPTIONS_HELP, parse_storage_options


def _cache(cfg: Any) -> None:
    from genrecal_cache.job.launch import run_cache

    res = run_cache(cfg)
    if cfg.result_json is not None:
        cfg.result_json.write_text(json.dumps(asdict(res)))
    print(f"cache-teacher: {res.samples} samples committed, {res.rejects} rejected, {res.label_tokens} label tokens, "
          f"{res.skipped} rows already done; {res.seconds:.1f}s ({res.forward_seconds:.1f}s teacher forward) "
          f"-> {cfg.output}")
    print(f"cache-teacher: rejects by reason: {res.top_reasons(20)}")
    if res.renamed:
        print(f"cache-teacher: {res.renamed} rows had an id seen before and were renamed id#k (--duplicate-ids)")
    if cfg.retry_rejects:
        print(f"cache-teacher: {res.retried} rejected rows run again (--retry-rejects); the counts above include them")
    if cfg.generation:
        print(f"cache-teacher: answers written by the teacher in {res.generate_seconds:.1f}s; {res.retokenized} of "
              "them render to other token ids than generated (their text was re-tokenised canonically)")


def _config_class() -> type:
    from genrecal_cache.job.config import CacheConfig

    return CacheConfig


@dataclass
class InspectConfig:
    """Look inside a teacher store: a summary by default, `--verify` for integrity, `--sample ID` for one sample,
    `--spot-check N --teacher PATH` to check it against the teacher."""

    store: str = flag("Teacher store written by cache-teacher: a folder, or an fsspec URL (s3://bucket/prefix) of a "
                      "copy on an object store.")
    verify: bool = flag("Read every chunk through its checksum and recompute the top-k from features x head.",
                        False)
    progress: bool = flag("Where a store being written stands, per part: rows committed (of all), samples, rate, "
                          "ETA, time since the last commit (reads only the commit records; safe while jobs run).",
                          False)
    sample: str | None = flag("Show this sample's teacher tokens with targets and top-k predictions.", None)
    topk: int = flag("How many of the stored top-k to show per token with --sample.", 3)
    json: bool = flag("Print machine-readable JSON instead of text.", False)
    plot: Path | None = flag("Write the feature-space picture here (PNG): t-SNE of the student's features, their "
                             "recalibrated version, the teacher's and the teacher's recalibrated features, for "
                             "held-out samples. Needs --student and --recalibrator.", None)
    student: str | None = flag("--plot: the student model directory.", None)
    recalibrator: list[str] | None = flag("--plot: one or more train-student Recalibrators, one row each: a "
                                          "stage folder (run/stage1/init, run/stage1/final) or its recalibrator/ "
                                          "subfolder.", None)
    plot_samples: int = flag("--plot: at most this many samples.", 300)
    spot_check: int | None = flag("Run --teacher again on this many stored samples drawn at random (--seed) as the "
                                  "job ran (its options recorded in the store) and compare token ids, label "
                                  "positions, features, top-k and generated answers with the store, within "
                                  "tolerances set by the feature dtype; exits 1 naming the samples on a failure.",
                                  None)
    teacher: str | None = flag("--spot-check: the teacher checkpoint (the store's own, to check it).", None)
    backend: str | None = flag("--spot-check: 'hf' or 'vllm' (default: the backend that wrote the store).", None)
    device: str | None = flag("--spot-check: the teacher's device (default: as the store's job ran).", None)
    seed: int = flag("--spot-check: the seed the samples are drawn with.", 0)
    storage_options: str | None = flag(STORAGE_OPTIONS_HELP, None)

    def __post_init__(self) -> None:
        self.storage_options_map = parse_storage_options(self.storage_options)


PLOT_ENTRY_POINTS = "genrecal.inspect_plot"  # where `inspect-cache --plot` finds its picture (genrecal_train)


def _plot(cfg: InspectConfig, store: Any) -> None:
    """The feature-space picture needs the Recalibrator, which lives in genrecal_train; it is found through an
    entry point, so this package never imports the trainer."""
    from importlib.metadata import entry_points

    if not cfg.student or not cfg.recalibrator:
        raise typer.BadParameter("--plot needs --student DIR and --recalibrator DIR", param_hint="--plot")
    found = entry_points(group=PLOT_ENTRY_POINTS)
    if not found:
        raise ConfigError(f"--plot: no picture is installed (entry point group {PLOT_ENTRY_POINTS!r}); install "
                          "GenRecal with its trainer: pip install -e .")
    draw = next(iter(found)).load()
    print(f"inspect-cache: wrote {draw(store, cfg.student, cfg.recalibrator, cfg.plot, cfg.plot_samples)}")


def _spot_check(cfg: InspectConfig, store: Any) -> None:
    from genrecal_cache.spot_check import format_spot_check, spot_check

    if not cfg.teacher:
        raise typer.BadParameter("--spot-check needs --teacher PATH (the checkpoint the store should match)",
                                 param_hint="--teacher")
    if cfg.spot_check < 1:
        raise typer.BadParameter(f"must be >= 1, got {cfg.spot_check}", param_hint="--spot-check")
    report = spot_check(store, cfg.spot_check, cfg.teacher, cfg.backend, cfg.device, cfg.seed)
    print(json.dumps(report.to_dict(), indent=2) if cfg.json else format_spot_check(report))
    if not report.ok:
        raise typer.Exit(1)


def _inspect(cfg: InspectConfig) -> None:
    from genrecal_cache.inspection import format_sample, format_summary, sample_view, summary
    from genrecal_cache.store.reader import TeacherStore
    from genrecal_cache.store.verify import format_verify, verify

    if cfg.progress:
        from genrecal_cache.inspection import format_progress, progress

        rows = progress(cfg.store, cfg.storage_options_map)
        print(json.dumps(rows, indent=2) if cfg.json else format_progress(rows))
        return
    store = TeacherStore(cfg.store, storage_options=cfg.storage_options_map)
    if cfg.plot is not None:
        _plot(cfg, store)
        return
    if cfg.spot_check is not None:
        _spot_check(cfg, store)
        return
    out: dict[str, Any] = {}
    if cfg.sample is not None:
        try:
            out["sample"] = sample_view(store, cfg.sample, cfg.topk)
        except KeyError as e:
            raise typer.BadParameter(str(e), param_hint="--sample") from None
    else:
        try:
            out["summary"] = summary(store)
        except StoreError as e:
            if not cfg.verify:
                raise
            typer.secho(f"summary unavailable ({e}); verifying", fg=typer.colors.YELLOW, err=True)
    if cfg.verify:
        out["verify"] = verify(store, progress=True)  # the bar on stderr
    if cfg.json:
        print(json.dumps({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in out.items()}, indent=2,
                         default=str))
    else:
        if "summary" in out:
            print(format_summary(out["summary"]))
        if "sample" in out:
            print(format_sample(out["sample"]))
        if "verify" in out:
            print(format_verify(out["verify"]))
    if "verify" in out and not out["verify"].ok:
        raise typer.Exit(1)


def cache_teacher_app() -> None:
    run_app(_config_class(), _cache, "cache-teacher")


def inspect_cache_app() -> None:
    run_app(InspectConfig, _inspect, "inspect-cache")
