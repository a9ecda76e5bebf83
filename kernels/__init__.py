"""GenRecal's fused kernels (imported as `genrecal_kernels`): Triton on CUDA, chunked PyTorch elsewhere.

`fused_linear_ce_kl`: the teacher-head CE + KL of Recalibrator outputs without (N, V) logits.
`proj_pre`, `proj_post_ln`: the Recalibrator's projections, fed stored features / carrying its LayerNorm.
`uld_loss`: Universal Logit Distillation (sorted-probability L1) from hidden states, in row chunks (a baseline).
`Impl`: the kernel paths every entry point's `impl=` chooses from (auto, triton, chunked, naive).
"""

from .dispatch import Impl
from .fused_linear_ce_kl import CEKLOutput, fused_linear_ce_kl, naive_linear_ce_kl
from .recal_proj import proj_post_ln, proj_pre
from .uld_loss import uld_loss

__all__ = ["CEKLOutput", "Impl", "fused_linear_ce_kl", "naive_linear_ce_kl", "proj_post_ln", "proj_pre", "uld_loss"]
