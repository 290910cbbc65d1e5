"""The ``state_update`` op: backends side by side (see :mod:`dfm_fused.ops`)."""
