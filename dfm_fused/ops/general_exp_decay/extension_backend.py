"""``general_exp_decay`` on the C++/CUDA extension: declined.

The extension's decay kernels form the symmetric ``M = Q^T diag(D) Q`` and use its
symmetry in backward (``grad_x = M g``, ``grad_Q = diag(D) Q (A + A^T)``); they have no
separate output map ``Qinv`` and no gradient for ``Qinv`` or ``S``.
"""
DECLINED = {
    "general_exp_decay": "its kernels implement only the symmetric mix Q^T diag(D) Q (no separate output map "
    "Qinv, no gradient for Qinv or S); the torch backend runs general_exp_decay",
}
