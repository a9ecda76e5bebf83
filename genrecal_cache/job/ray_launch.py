"""`cache-teacher --ray`: the `--data-parallel-size` copies of the job as Ray tasks, each on its own GPU group and
writing the part it would write on one machine; a copy that crashes is re-run and resumes. Counts are summed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genrecal_cache.core.errors import ConfigError

if TYPE_CHECKING:  # the Ray worker imports this module to run `run_part`: it stays light
    from .config import CacheConfig, CacheResult

ERROR_LINES = 12  # of a failed part's stderr, shown on the console
_PASSED_ON = ("HF_", "TRANSFORMERS_", "VLLM_", "GENRECAL_", "TOKENIZERS_")  # environment the tasks get from here


class PartFailed(Exception):
    """A part's job stopped on a user error (exit status 2): its message says the fix, so it is not re-run."""


class PartCrashed(PartFailed):
    """A part's job crashed (killed, out of memory, an unexpected exception): Ray re-runs it."""


def run_part(argv: list[str]) -> dict[str, Any]:
    """A Ray task: one copy of the job in a subprocess (on the GPUs Ray gave this task, as CUDA_VISIBLE_DEVICES);
    returns its counts. The subprocess resumes the part after its last commit, so a retry loses little."""
    with tempfile.TemporaryDirectory(prefix="genrecal-ray-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        # Its stderr is a log: no bars in it. It dies with its Ray worker, so a retry never finds the part locked
        # by an orphan.
        env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", GENRECAL_DIE_WITH_PARENT="1")
        with open(log, "wb") as err:  # its own process group: whatever it started (engine processes) ends with it
            p = subprocess.Popen([sys.executable, "-m", "genrecal_cache", "cache-teacher", *argv, "--result-json",
                                  str(result)], env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                rc = p.wait()
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if rc == 0:
            return json.loads(result.read_text())
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-ERROR_LINES:]
    why = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
    raise (PartFailed if rc == 2 else PartCrashed)("\n".join([f"{why} on {platform.node()}", *tail]))


def run_ray(cfg: CacheConfig) -> CacheResult:
    """`--ray`: the copies of `run_data_parallel` as Ray tasks on the cluster of `--ray-address`, each reserving
    tp x pp GPUs (with --device cuda) and 1 + its render workers CPUs, re-run up to `--ray-retries` times."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray here and on every node of the cluster: pip install -e '.[ray]' in the "
                          "GenRecal clone") from None
    from genrecal_cache.core.config import to_argv

    from .config import CacheResult
    from .parallel import add_counts, copy_configs, parts_failed

    gpus = cfg.tensor_parallel_size * cfg.pipeline_parallel_size if cfg.device.startswith("cuda") else 0
    children = [replace(c, progress=False) for c in copy_configs(_absolute(cfg))]  # no bar: stderr is a log
    cpus = 1 + children[0].render_workers
    # Ray's logs and the workers' output stay off this console (Ray still announces each retry); a failed part's
    # last lines are shown below.
    try:
        ray.init(address=cfg.ray_address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ON)}})
    except ConnectionError as e:
        where = cfg.ray_address or f"(RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')})"
        raise ConfigError(f"--ray-address {where}: {e} (start one with `ray start --head`, or leave "
                          "--ray-address out to start one on this machine)") from None
    res, failed = CacheResult(), []
    try:
        _warn_if_unplaceable(ray.nodes(), gpus, cpus)
        if not gpus and ray.cluster_resources().get("GPU", 0):
            print(f"cache-teacher: warning: --device is {cfg.device} (resolved on this machine), so the parts run "
                  "on CPU although the cluster has GPUs: pass --device cuda", file=sys.stderr)
        task = ray.remote(run_part)
        refs = [(task.options(name=f"cache-teacher part {c.shard}", num_gpus=gpus, num_cpus=cpus,
                              max_retries=cfg.ray_retries, retry_exceptions=[PartCrashed]).remote(to_argv(c)), c)
                for c in children]
        if cfg.progress:
            print(f"cache-teacher: {len(refs)} parts running as Ray tasks; `inspect-cache --store {cfg.output} "
                  "--progress` shows where they stand", file=sys.stderr)
        for ref, child in refs:
            try:
                add_counts(res, ray.get(ref))
            except ray.exceptions.RayError as e:
                lines = _why(e).splitlines()
                print(f"cache-teacher: part {child.shard} failed: {lines[0]}", *lines[1:], sep="\n    ",
                      file=sys.stderr)
                failed.append(f"part {child.shard} ({lines[0]})")
    finally:
        ray.shutdown()
    if failed:
        raise parts_failed(failed, teacher_failed=any("(exit status 3 on" in f for f in failed))
    return res


def _absolute(cfg: CacheConfig) -> CacheConfig:
    """Relative paths made absolute here: a task runs in its node's own working folder."""
    from genrecal_cache.data.sources import HUB_PREFIX

    teacher = os.path.abspath(cfg.teacher) if os.path.exists(cfg.teacher) else cfg.teacher  # else a hub id
    manifest = cfg.manifest if cfg.manifest.startswith(HUB_PREFIX) or "://" in cfg.manifest else \
        os.path.abspath(cfg.manifest)
    output, root = (x.absolute() if isinstance(x, Path) else x for x in (cfg.output, cfg.image_root))  # URLs as given
    return replace(cfg, teacher=teacher, manifest=manifest, output=output, image_root=root)


def _why(e: Exception) -> str:
    """What went wrong in a task: the part's own error, else the last line of Ray's (a lost node, say)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, PartFailed):
        return str(cause)
    return (str(e).strip().splitlines() or [type(e).__name__])[-1]


def _warn_if_unplaceable(nodes: list[dict[str, Any]], gpus: int, cpus: int) -> None:
    """Ray waits, silently here, for a node able to run a part: say so when none is there yet."""
    if not any(n["Resources"].get("GPU", 0) >= gpus and n["Resources"].get("CPU", 0) >= cpus
               for n in nodes if n.get("Alive")):
        print(f"cache-teacher: warning: no node of the Ray cluster has the {gpus} GPUs and {cpus} CPUs one part "
              "needs (--tensor-parallel-size x --pipeline-parallel-size, 1 + --render-workers / "
              "--data-parallel-size); the parts wait for one to join. Ctrl-C to stop.", file=sys.stderr)
