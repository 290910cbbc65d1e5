"""Exceptions shared by the dispatch and the extension loader (a leaf module: it imports nothing of
dfm_fused, so both can raise them without importing each other)."""
from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""
