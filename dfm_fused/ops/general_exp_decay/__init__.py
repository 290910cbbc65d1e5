"""The ``general_exp_decay`` op: ``Qinv diag(exp(t Delta)) Q x`` with a free output map.

Backends side by side (see :mod:`dfm_fused.ops`). Only the torch backend implements it;
the others decline through the dispatch with their reason (``DECLINED``).
"""
