"""Benchmark cases, shared by the ``benchmarks/`` pytest suite and the CLI.

A case is a frozen description (op or model, shape, dtype, device, implementation)
that :meth:`build` turns into a :class:`Bench`: ready inputs and a ``run()`` that
does one forward (and backward) pass and waits for the device. Cases compare
implementations on the same inputs: every case of a :attr:`group` builds the
same tensors from the same seed.

Implementations (``impl``): ``reference`` (:mod:`dfm_fused.reference`, eager),
``reference-compiled`` (the reference under ``torch.compile``, as ``dfbmodels`` ships its
layers) and the dfm_fused backends (``torch``, ``triton``, and ``extension``, named ``cpp`` on the
CPU and ``cuda`` on a GPU as in earlier results) forced with ``backend=``. Op cases: the three ops, and ``StateUpdate``: the module in training after
its QR at t=0, which takes the scalar-decay path (docs/design.md, 'Scalar decay'), against the reference's
``h + StateExpDecay(GroupNorm(y), t)``. End-to-end
cases compare a reference model (plain graph over T steps; ``reference-compiled``:
its layers under ``torch.compile`` as shipped) with the dfm_fused model in the three
``unroll`` modes: full recompute (``fused``, ``checkpoint=True``), selective
(``fused-selective``) and the plain graph (``fused-nockpt``), and with the
whole iteration as one CUDA graph (``graphed``).

The cases live in :mod:`dfm_fused.bench.op_cases` and :mod:`dfm_fused.bench.e2e_cases`, what they
share in :mod:`dfm_fused.bench._case_base`; this module gathers them under one name.
"""
from __future__ import annotations

from dfm_fused.bench._case_base import (
    CPU_SHAPES,
    DTYPES,
    EXTENSION_IMPLS,
    GPU_SHAPES,
    OPERATING_POINT,
    QUICK_SHAPES,
    REFERENCE_IMPLS,
    Bench,
    Shape,
    backend_of,
    default_shapes,
    fused_impls,
    parse_shape,
)
from dfm_fused.bench.e2e_cases import E2E_CHECKPOINT, E2E_IMPLS, E2E_MODES, E2ECase, e2e_cases, models_available
from dfm_fused.bench.op_cases import MODES, OPS, OpCase, op_cases

__all__ = [
    "CPU_SHAPES",
    "DTYPES",
    "E2E_CHECKPOINT",
    "E2E_IMPLS",
    "E2E_MODES",
    "EXTENSION_IMPLS",
    "GPU_SHAPES",
    "MODES",
    "OPERATING_POINT",
    "OPS",
    "QUICK_SHAPES",
    "REFERENCE_IMPLS",
    "Bench",
    "E2ECase",
    "OpCase",
    "Shape",
    "backend_of",
    "case_from_spec",
    "default_shapes",
    "e2e_cases",
    "fused_impls",
    "models_available",
    "op_cases",
    "parse_shape",
]


def case_from_spec(spec: dict):
    """Inverse of ``case.spec()``."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "op":
        return OpCase(**{**spec, "shape": Shape(**spec["shape"])})
    return E2ECase(**{**spec, "image": tuple(spec["image"])})
