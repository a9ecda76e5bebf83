"""GenRecal's Triton kernels (imported as `genrecal_kernels`), each with a pure-PyTorch path for CPU.

Empty until the kernels issue lands: the fused teacher-head CE + KL and the fused Recalibrator projections.
"""
