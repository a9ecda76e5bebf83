"""Phase 1 of GenRecal: run the teacher once over a dataset and cache what distillation needs.

`cache-teacher` writes a Zarr v3 teacher store; `inspect-cache` looks inside one. Layers, each importing only
those below it: `core` < `data`, `store` < `teacher` < `job` < `inspection`, `cli` (docs/DESIGN.md, "Layout").
"""

__version__ = "0.1.0"
