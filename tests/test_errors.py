"""Bad arguments to the functional ops raise clear errors naming the argument, before any work."""
import pytest
import torch

import dfm_fused

from _helpers import decay_args


def _decay(C=8):
    Q, S = decay_args(C)
    return Q.detach(), S


def test_exp_decay_errors():
    Q, S = _decay()
    x = torch.randn(2, 8, 3, 3)
    cases = [
        ((torch.randn(8, 3, 3), Q, S, 1, 1, 1), ValueError, r"x: expected a 4-D tensor; got 3-D"),
        ((torch.randn(2, 7, 3, 3), Q, S, 1, 1, 1), ValueError, r"Q: expected shape \(7, 7\) to match x.shape\[1\]=7"),
        ((x, Q, S[:5], 1, 1, 1), ValueError, r"S: expected shape \(8,\)"),
        ((x, Q[0], S, 1, 1, 1), ValueError, r"Q: expected a 2-D tensor"),
        ((x.long(), Q, S, 1, 1, 1), TypeError, r"x: expected a floating-point tensor .* got torch.int64"),
        ((x, Q, S, 1, 0.0, 1), ValueError, r"tau: expected a number > 0; got 0.0"),
        ((x, Q, S, 1, float("nan"), 1), ValueError, r"tau: expected a finite number"),
        ((x, Q, S, "1", 1, 1), TypeError, r"t: expected a real number or a 0-d tensor; got str"),
        ((x, Q, S, torch.ones(2), 1, 1), ValueError, r"t: expected a number or a 0-d tensor"),
        ((x, Q.to("meta"), S, 1, 1, 1), ValueError, r"expected all tensors on one device; got x on cpu, Q on meta"),
        (([1.0], Q, S, 1, 1, 1), TypeError, r"x: expected a torch.Tensor; got list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            dfm_fused.exp_decay(*args)


def test_state_update_errors():
    Q, S = _decay()
    h = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match=r"y: expected the shape of h \(2, 8, 3, 3\); got \(2, 8, 3, 4\)"):
        dfm_fused.state_update(h, torch.randn(2, 8, 3, 4), Q, S, 1, 1, 1, 2)
    with pytest.raises(ValueError, match=r"groups: expected a divisor of h.shape\[1\]=8; got 3"):
        dfm_fused.state_update(h, h, Q, S, 1, 1, 1, 3)
    with pytest.raises(ValueError, match=r"groups: expected an int >= 1; got 0"):
        dfm_fused.state_update(h, h, Q, S, 1, 1, 1, 0)
    with pytest.raises(TypeError, match=r"groups: expected an int; got float"):
        dfm_fused.state_update(h, h, Q, S, 1, 1, 1, 2.0)
    with pytest.raises(ValueError, match=r"eps: expected a number > 0"):
        dfm_fused.state_update(h, h, Q, S, 1, 1, 1, 2, -1.0)
    with pytest.raises(ValueError, match=r"expected all tensors on one device; got h on cpu, y on meta"):
        dfm_fused.state_update(h, h.to("meta"), Q, S, 1, 1, 1, 2)


def test_feedback_input_errors():
    x = torch.randn(2, 4, 6, 6)
    h = torch.randn(2, 10, 3, 3)
    with pytest.raises(ValueError, match=r"offset \+ fb: expected at most h.shape\[1\]=10; got 6 \+ 6 = 12"):
        dfm_fused.feedback_input(x, h, 6, 6, 2)
    with pytest.raises(ValueError, match=r"groups: expected a divisor of fb=6; got 4"):
        dfm_fused.feedback_input(x, h, 0, 6, 4)
    with pytest.raises(ValueError, match=r"h: expected batch size 2 to match x; got 3"):
        dfm_fused.feedback_input(x, torch.randn(3, 10, 3, 3), 0, 6, 2)
    with pytest.raises(ValueError, match=r"offset: expected an int >= 0; got -1"):
        dfm_fused.feedback_input(x, h, -1, 6, 2)
    with pytest.raises(ValueError, match=r"h: expected a 4-D tensor"):
        dfm_fused.feedback_input(x, h[0], 0, 6, 2)


def test_mixed_float_dtypes_are_supported_not_errors():
    """A half-precision activation with a float32 state and Q is the normal mixed-precision case."""
    Q, S = _decay()
    h = torch.randn(2, 8, 3, 3)
    out = dfm_fused.state_update(h, h.half(), Q, S, 1, 1, 1, 2)
    assert out.dtype == torch.float32
