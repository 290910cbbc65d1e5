"""Whole DFM iterations as CUDA graphs, replayed without the host.

- :func:`capture_train_step`: forward over T steps, loss, backward and optimizer
  step in one graph; ``loss = step(x, target)``;
- :func:`capture_inference`: the forward at fixed T, or with the reference's early
  stop checked on the device once per chunk of steps; ``logits = infer(x)``;
- :class:`CaptureError`: raised for anything that cannot be captured (a host
  sync, a CPU tensor, early stop in training, ...), naming it.

Built on ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph``: warm-up and capture on
a side stream, graph-safe RNG (the device's default generator is registered
with every capture, so dropout draws fresh masks at each replay), autocast
without its cast cache. CUDA graphs need a CUDA device; on the CPU both
functions raise and the rest of ``dfm_fused`` is unaffected.
"""
from dfm_fused.capture._guards import CaptureError
from dfm_fused.capture.inference import CapturedInference, capture_inference
from dfm_fused.capture.train import CapturedTrainStep, capture_train_step

__all__ = ["CaptureError", "CapturedInference", "CapturedTrainStep", "capture_inference", "capture_train_step"]
