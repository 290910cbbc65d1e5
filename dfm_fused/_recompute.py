"""Whether the current thread is replaying a step inside ``unroll``'s backward.

Modules whose forward has a side effect that must happen once per real step
(``StateExpDecay``'s QR re-orthogonalisation at ``T == 0``) consult this flag.
"""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()


def is_recomputing() -> bool:
    """True while ``dfm_fused.unroll`` re-runs a step to back-propagate through it."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def recomputing():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
