"""The ``feedback_input`` op: backends side by side (see :mod:`dfm_fused.ops`)."""
