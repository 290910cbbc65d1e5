"""The ``exp_decay`` op: backends side by side (see :mod:`dfm_fused.ops`)."""
