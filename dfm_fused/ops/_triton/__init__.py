"""Triton building blocks shared by the ``triton`` backends.

- :mod:`.host`: autotune config lists and pruning, NaN-poisoned outputs, ``tl.dot`` operand
  dtype and precision, the dtype check.
- :mod:`.channel`: a C x C channel matrix per pixel (GEMM or diagonal) with an optional fused
  GroupNorm affine and residual, and the deterministic channel outer product ``sum x g^T``.
- :mod:`.group_norm`: GroupNorm statistics and backward, one program per (image, group).
"""
