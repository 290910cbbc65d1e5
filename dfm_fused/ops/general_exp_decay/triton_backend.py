"""``general_exp_decay`` in Triton: declined.

The Triton decay kernels apply the symmetric ``M = Q^T diag(D) Q`` and reuse it for
``grad_x``; a general output map needs ``M^T`` in backward and gradients for ``Qinv``
and ``S``, which they do not compute.
"""
DECLINED = {
    "general_exp_decay": "its kernels implement only the symmetric mix Q^T diag(D) Q (no separate output map "
    "Qinv, no gradient for Qinv or S); the torch backend runs general_exp_decay",
}
