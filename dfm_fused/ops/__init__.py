"""The fused ops, one package each, every backend of an op side by side.

``dfm_fused/ops/<op>/torch_backend.py``: portable closed forms in PyTorch;
``triton_backend.py``: Triton kernels; ``extension_backend.py``: the C++/CUDA
extension (``csrc/``). The literal oracle is :mod:`dfm_fused.reference`.
"""
