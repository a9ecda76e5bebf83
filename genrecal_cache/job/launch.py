"""`run_cache`: the `cache-teacher` job as configured: one writer here (`cache_job.py`), its data-parallel copies
in subprocesses (`parallel.py`), or the same copies as Ray tasks (`ray_launch.py`).
"""

from __future__ import annotations

from genrecal_cache.teacher.base import Teacher

from .cache_job import CacheJob
from .config import CacheConfig, CacheResult


def run_cache(cfg: CacheConfig, teacher: Teacher | None = None) -> CacheResult:
    """Run the job; a teacher it loads itself (none given) is closed at the end (a vLLM engine's processes)."""
    if cfg.ray:
        from .ray_launch import run_ray

        return run_ray(cfg)
    if cfg.data_parallel_size > 1:
        from .parallel import run_data_parallel

        return run_data_parallel(cfg)
    job = CacheJob(cfg, teacher)
    try:
        return job.run()
    finally:
        if teacher is None:
            job.teacher.close()
