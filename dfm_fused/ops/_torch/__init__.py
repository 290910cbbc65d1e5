"""PyTorch building blocks of the ``torch`` backends (plain ATen GEMMs and GroupNorm).

- :mod:`.channel`: a C x C channel matrix applied per pixel, and ``sum x g^T`` over pixels.
- :mod:`.decay`: the decay ``Q^T diag(D) Q x`` and its backward by the cheaper GEMM order.
- :mod:`.group_norm`: GroupNorm (no affine by default) forward, normalise from statistics, backward.
"""
