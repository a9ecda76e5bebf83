"""GenRecal's fused kernels (imported as `genrecal_kernels`): Triton on CUDA, chunked PyTorch elsewhere.

`fused_linear_ce_kl`: the teacher-head CE + KL of Recalibrator outputs without (N, V) logits.
"""

from .fused_linear_ce_kl import CEKLOutput, fused_linear_ce_kl, naive_linear_ce_kl

__all__ = ["CEKLOutput", "fused_linear_ce_kl", "naive_linear_ce_kl"]
