"""Whole DFMs on the fused ops.

- :class:`ResNet18`, :class:`ResNet34`, :class:`ResNet50`: the reference ResNet DFMs;
- :class:`SegmentationDFM`: encoder-decoder DFM for dense prediction, state at 1/4 resolution;
- :func:`load_reference_state_dict`: load a ``dfbmodels`` checkpoint;
- :mod:`dfm_fused.models.small`: a small DFM for end-to-end benchmarks and tests;
- :mod:`dfm_fused.models.reference`: literal transcription of the reference ResNet DFM, and the
  small DFM's reference twin (the model-level oracle; :mod:`dfm_fused.reference` is the op-level one).
"""
from dfm_fused.models import reference
from dfm_fused.models._checkpoint import load_reference_state_dict
from dfm_fused.models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from dfm_fused.models.segmentation import SegmentationDFM

__all__ = [
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SegmentationDFM",
    "load_reference_state_dict",
    "reference",
]
