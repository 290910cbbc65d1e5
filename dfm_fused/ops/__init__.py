"""The fused ops, one package each, every backend of an op side by side.

``dfm_fused/ops/<op>/torch_backend.py``: portable closed forms in PyTorch;
``triton_backend.py``: Triton kernels (``triton_kernels.py`` holds the ones only that op uses);
``extension_backend.py``: the C++/CUDA extension (``csrc/``). The literal oracle is
:mod:`dfm_fused.reference`.

Code several ops use lives outside the op folders, and no op folder imports another:
:mod:`._decay` (the decay math every backend shares), :mod:`._autograd` (helpers for the
``autograd.Function`` of every backend), :mod:`._torch` (PyTorch building blocks),
:mod:`._triton` (Triton building blocks).
"""
